"""``python -m orchestrator report DIR``: the study's report as ``report.html`` and ``report.md``.

The HTML is one self-contained file (images embedded as base64 PNG, inline CSS, no script, no
network) that opens in a browser without a server. Both files hold: the study's settings; the
Pareto plot (utility vs privacy, one colour per defense, the front drawn, the control marked);
the Pareto-optimal trials with their hyperparameters and hypervolume; for each defense the best
trial within a utility loss (default 1 point) of the ``none`` control; reconstruction grids of
the control and of each defense's best trial, per attack, when images were logged; attack
success rates; epsilon where it applies; and the study's cost.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.analysis import Analysis
from orchestrator.config import StudyConfig, StudyFileError, load_study
from orchestrator.plots import pareto_plot
from orchestrator.results import atomic_write
from orchestrator.values import is_missing


class NothingToReportError(RuntimeError):
    """The study folder has no completed trial yet (the message says how many ran or failed)."""


@dataclass
class Choice:
    """The best trial of one defense within the utility budget (or why there is none)."""

    defense: str
    trial: pd.Series | None
    note: str


def _fmt(v: Any, digits: int = 4) -> str:
    if is_missing(v):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _percent(v: float | None) -> str:
    """A share as a whole percentage, or a dash when missing."""
    return "–" if v is None or is_missing(v) else f"{v:.0%}"


def _objectives(cfg: StudyConfig) -> tuple[Any, Any]:
    """The utility objective (first ``max``) and the privacy objective (first ``min``)."""
    objs = cfg.objectives
    utility = next((o for o in objs if o.mode == "max"), objs[0])
    privacy = next((o for o in objs if o.mode == "min" and o is not utility), objs[-1])
    return utility, privacy


def best_within_budget(df: pd.DataFrame, cfg: StudyConfig, utility_loss: float) -> list[Choice]:
    """For each defense, the completed trial with the best privacy whose utility is at most
    ``utility_loss`` below the best completed ``none`` control."""
    utility, privacy = _objectives(cfg)
    done = df[df["status"] == "completed"]
    control = done[done["defense"] == "none"]
    base = float(control[utility.metric].max()) if not control.empty else None
    choices = []
    for defense in cfg.defenses:
        rows = done[done["defense"] == defense].dropna(subset=[utility.metric, privacy.metric])
        if rows.empty:
            choices.append(Choice(defense, None, "no completed trial"))
            continue
        if base is not None and defense != "none":
            ok = rows[rows[utility.metric] >= base - utility_loss]
            if ok.empty:
                best = rows.loc[rows[utility.metric].idxmax()]
                choices.append(
                    Choice(
                        defense,
                        best,
                        f"no trial within {utility_loss:g} of the "
                        f"control's {utility.metric}; shown: its best utility",
                    )
                )
                continue
            rows = ok
        pick = (
            rows[privacy.metric].idxmin()
            if privacy.mode == "min"
            else rows[privacy.metric].idxmax()
        )
        note = (
            "the control"
            if defense == "none"
            else (
                f"best {privacy.metric} within {utility_loss:g} of the control"
                if base is not None
                else "no control completed: best privacy"
            )
        )
        choices.append(Choice(defense, rows.loc[pick], note))
    return choices


def _png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _grids(folder: Path, trial_id: str) -> list[Path]:
    d = folder / "images" / str(trial_id)
    return sorted(d.glob("*.png")) if d.is_dir() else []


def _table_html(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table_md(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _params(row: pd.Series) -> str:
    items = [
        f"{k[len('param_') :]}={_fmt(v)}"
        for k, v in row.items()
        if isinstance(k, str) and k.startswith("param_") and not is_missing(v)
    ]
    return ", ".join(items) or "defaults"


Section = tuple[str, str, str]  # (title, html, markdown)


def report(folder: Path, *, utility_loss: float = 0.01) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.md`` and the front's plot ``report_pareto.png`` from a
    study's files, which it only reads (the front is recomputed in memory; the tables are
    opened read-only, so a study running in the folder is not disturbed).

    Raises:
        StudyFileError: ``folder`` is not a study's output folder.
        NothingToReportError: no trial of the study has completed yet.
        StudyIOError: a table cannot be read (truncated, corrupt).
    """
    from orchestrator.analysis import analyse
    from orchestrator.results import ResultStore
    from orchestrator.summary import objectives_of

    folder = Path(folder).resolve()
    if not (folder / "trials.parquet").exists():
        raise StudyFileError(f"{folder}: no trials.parquet here; pass a study's output folder")
    if not (folder / "study.yaml").exists():
        raise StudyFileError(f"{folder}: no study.yaml here; pass a study's output folder")
    cfg = load_study(folder / "study.yaml", {"output": str(folder.parent), "study": folder.name})
    store = ResultStore(folder, read_only=True)
    results = analyse(objectives_of(cfg), store.trials())
    if not results.completed:
        statuses = store.trials()["status"].value_counts().to_dict() if len(store.trials()) else {}
        counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no trials"
        raise NothingToReportError(
            f"{folder}: no completed trial yet ({counts}); nothing to report. Run or resume "
            "the study, then report again"
        )
    df = results.trials
    choices = best_within_budget(df, cfg, utility_loss)
    sections: list[Section] = [
        _validity_section(cfg, df),
        _settings_section(cfg),
        *_front_sections(cfg, folder, results, store.attacks()),
        _best_section(cfg, choices, utility_loss),
        _grids_section(cfg, folder, choices),
        _success_section(cfg, df, store.attacks()),
        _cost_section(cfg, df),
    ]
    return _write_pages(cfg, folder, sections)


def _validity_section(cfg: StudyConfig, df: pd.DataFrame) -> Section:
    """ "Can this study rank defenses?": the control's strongest attack against the study's
    validity thresholds (:func:`orchestrator.validity.check_validity`): its gain over the
    population mean image and its identification rate, the flat image's figure beside them."""
    from orchestrator.validity import check_study

    verdict = check_study(df, cfg.validity)
    answer = {"ok": "Yes.", "attacks_too_weak": "No.", "no_control": "Cannot tell."}
    rows = [
        ["verdict", verdict.status],
        ["control trial", verdict.control_trial or "–"],
        ["best attack's PSNR gain over the population mean image (dB)", _fmt(verdict.gain_db, 3)],
        ["needed (validity.min_gain_db)", _fmt(verdict.min_gain_db, 3)],
        ["share of victims identified", _percent(verdict.identified)],
        ["needed (validity.min_identified)", _percent(verdict.min_identified)],
        ["its gain over a flat image (dB, a weak baseline)", _fmt(verdict.flat_gain_db, 3)],
        ["best attack's SSIM", _fmt(verdict.ssim, 3)],
        ["needed (validity.min_ssim)", _fmt(verdict.min_ssim, 3)],
    ]
    message = verdict.message()
    text = f"{answer[verdict.status]} {message[0].upper()}{message[1:]}."
    css = "ok" if verdict.ok else "warning"
    return (
        "Can this study rank defenses?",
        f'<p class="{css}">{html.escape(text)}</p>' + _table_html(["", "value"], rows),
        f"**{text}**\n\n" + _table_md(["", "value"], rows),
    )


def _settings_section(cfg: StudyConfig) -> Section:
    """The study's settings as a table."""
    f = cfg.federation
    settings = [
        ["dataset", f"{cfg.data.dataset} ({cfg.data.image_size or 'native'} px)"],
        ["model", f"{cfg.model.name} {cfg.model.options() or ''}".strip()],
        [
            "federation",
            f"{f.algorithm}, {f.clients} clients ({f.clients_per_round} per round), "
            f"{f.rounds} rounds, batch {f.batch_size}, lr {f.lr}, "
            f"partition {f.partition.scheme}",
        ],
        [
            "defenses",
            ", ".join(f"{d} ({', '.join(r) or 'fixed'})" for d, r in cfg.search_ranges().items()),
        ],
        [
            "attacks",
            ", ".join(
                f"{a.key} (rounds {a.rounds}, {a.victims} victim(s)"
                + (
                    f"; public data: {a.capabilities.public_data.describe(cfg.data.dataset)}"
                    if a.capabilities.public_data is not None
                    else ""
                )
                + ")"
                for a in cfg.attacks
            ),
        ],
        ["objectives", ", ".join(f"{o.metric} ({o.mode})" for o in cfg.objectives)],
        [
            "search",
            f"{cfg.search.sampler}, {cfg.search.trials} trials, concurrency "
            f"{cfg.search.concurrency}, seed {cfg.seed}",
        ],
    ]
    return (
        "Settings",
        _table_html(["setting", "value"], settings),
        _table_md(["setting", "value"], settings),
    )


def _front_sections(
    cfg: StudyConfig, folder: Path, results: Analysis, attacks: pd.DataFrame
) -> list[Section]:
    """The front's plot (drawn to ``report_pareto.png``, with the mean-image line) and its
    trials."""
    from orchestrator.summary import objectives_of
    from orchestrator.validity import prior_baseline

    df = results.trials
    obj_cols = [o.metric for o in cfg.objectives]
    sections: list[Section] = []
    plot = folder / "report_pareto.png"
    if results.completed:
        pareto_plot(
            df,
            objectives_of(cfg),
            plot,
            title=f"{cfg.study}: Pareto front",
            baseline=prior_baseline(objectives_of(cfg)[1].metric, attacks),
        )
    hv = "–" if results.hypervolume is None else f"{results.hypervolume:.4g}"
    plot_html = (
        f'<img alt="Pareto front" src="{_png_data(plot)}">'
        if plot.exists()
        else "<p>No completed trial to plot.</p>"
    )
    sections.append(
        (
            "Pareto front",
            plot_html + f"<p>Hypervolume: {hv}</p>",
            "![Pareto front](report_pareto.png)\n\nHypervolume: " + hv,
        )
    )
    headers = ["trial", "defense", *obj_cols, "epsilon", "hyperparameters"]
    rows = [
        [
            str(r["number"]),
            str(r["defense"]),
            *[_fmt(r.get(c)) for c in obj_cols],
            _fmt(r.get("epsilon")),
            _params(r),
        ]
        for _, r in results.front.iterrows()
    ]
    sections.append(("Pareto-optimal trials", _table_html(headers, rows), _table_md(headers, rows)))

    return sections


def _best_section(cfg: StudyConfig, choices: list[Choice], utility_loss: float) -> Section:
    """Each defense's best trial within ``utility_loss`` of the control."""
    utility, privacy = _objectives(cfg)
    headers = [
        "defense",
        "trial",
        utility.metric,
        privacy.metric,
        "epsilon",
        "note",
        "hyperparameters",
    ]
    rows = [
        [c.defense, "–", "–", "–", "–", c.note, "–"]
        if c.trial is None
        else [
            c.defense,
            str(c.trial["number"]),
            _fmt(c.trial[utility.metric]),
            _fmt(c.trial[privacy.metric]),
            _fmt(c.trial.get("epsilon")),
            c.note,
            _params(c.trial),
        ]
        for c in choices
    ]
    title = f"Best trial per defense within {utility_loss:g} {utility.metric} of the control"
    return (title, _table_html(headers, rows), _table_md(headers, rows))


def _grids_section(cfg: StudyConfig, folder: Path, choices: list[Choice]) -> Section:
    """The reconstruction grids of each defense's best trial, or why there are none."""
    grid_html, grid_md = [], []
    for c in choices:
        if c.trial is None:
            continue
        for path in _grids(folder, c.trial["trial_id"]):
            caption = f"{c.defense} (trial {c.trial['number']}): {path.stem}"
            grid_html.append(
                f'<figure><img alt="{html.escape(caption)}" '
                f'src="{_png_data(path)}"><figcaption>{html.escape(caption)}'
                "</figcaption></figure>"
            )
            rel = path.relative_to(folder)
            grid_md.append(f"![{caption}]({rel.as_posix()})")
    if grid_html:
        return (
            "Reconstructions (ground truth above, reconstruction below)",
            "".join(grid_html),
            "\n\n".join(grid_md),
        )
    why = (
        "tracking.log_images is 'none'"
        if cfg.tracking.log_images == "none"
        else "no image grids were found"
    )
    return ("Reconstructions", f"<p>Not shown: {html.escape(why)}.</p>", f"Not shown: {why}.")


def _success_section(cfg: StudyConfig, df: pd.DataFrame, attacks: pd.DataFrame) -> Section:
    """Per defense and attack over the completed trials: images, success rate, PSNR, PSNR gain
    over the population mean image (``prior_gain``) and over a flat image (``psnr_gain``), the
    share of images identified, SSIM."""
    rows = []
    if not attacks.empty:
        done_ids = set(df.loc[df["status"] == "completed", "trial_id"])
        a = attacks[attacks["trial_id"].isin(done_ids)].merge(
            df[["trial_id", "defense"]], on="trial_id"
        )
        a["success"] = a["psnr"] >= cfg.success_psnr
        grouped = a.groupby(["defense", "attack"]).agg(
            images=("psnr", "size"),
            success_rate=("success", "mean"),
            psnr_mean=("psnr", "mean"),
            psnr_max=("psnr", "max"),
            prior_mean=("prior_gain", "mean"),
            prior_max=("prior_gain", "max"),
            identified=("identified", "mean"),
            gain_max=("psnr_gain", "max"),
            ssim_max=("ssim", "max"),
        )
        for (defense, attack), g in grouped.iterrows():
            rows.append(
                [
                    defense,
                    attack,
                    str(int(g["images"])),
                    f"{g['success_rate']:.0%}",
                    _fmt(g["psnr_mean"]),
                    _fmt(g["psnr_max"]),
                    _fmt(g["prior_mean"]),
                    _fmt(g["prior_max"]),
                    "–" if pd.isna(g["identified"]) else f"{g['identified']:.0%}",
                    _fmt(g["gain_max"]),
                    _fmt(g["ssim_max"]),
                ]
            )
    headers = [
        "defense",
        "attack",
        "images",
        f"success (PSNR ≥ {cfg.success_psnr:g} dB)",
        "PSNR mean",
        "PSNR max",
        "gain over mean image, mean",
        "gain over mean image, max",
        "identified",
        "gain over flat, max",
        "SSIM max",
    ]
    return (
        "Attack success rates (all trials)",
        _table_html(headers, rows),
        _table_md(headers, rows),
    )


def _cost_section(cfg: StudyConfig, df: pd.DataFrame) -> Section:
    """Trials run and their compute, in CPU- or GPU-hours."""
    done = df[df["status"] == "completed"]
    seconds = (
        float(
            (done.get("seconds_train", 0).fillna(0) + done.get("seconds_attack", 0).fillna(0)).sum()
        )
        if not done.empty
        else 0.0
    )
    gpu = bool(not done.empty and done["device"].fillna("").str.startswith("cuda").any())
    unit = "GPU-hours" if gpu else "CPU-hours"
    per_trial = cfg.resources.gpu if gpu else cfg.resources.cpu
    cost = [
        ["trials", f"{len(done)} completed, {int((df['status'] == 'failed').sum())} failed"],
        [
            "compute",
            f"{seconds / 3600:.3g} h of trial time × {per_trial:g} "
            f"{'GPU' if gpu else 'CPU'} per trial = "
            f"{seconds / 3600 * per_trial:.3g} {unit}",
        ],
    ]
    return ("Cost", _table_html(["", ""], cost), _table_md(["", ""], cost))


def _write_pages(cfg: StudyConfig, folder: Path, sections: list[Section]) -> tuple[Path, Path]:
    """``report.html`` (self-contained) and ``report.md``, each written atomically."""
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f2f2f2}"
        "img{max-width:100%}figure{display:inline-block;margin:8px}"
        "figcaption{font-size:12px;color:#555}"
        ".warning{background:#fff3cd;border-left:4px solid #d39e00;padding:8px}"
        ".ok{background:#e9f7ef;border-left:4px solid #2e8b57;padding:8px}"
    )
    body = "".join(f"<h2>{html.escape(t)}</h2>\n{h}\n" for t, h, _ in sections)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Obscura report: {html.escape(cfg.study)}</title><style>{css}</style>"
        f"</head><body><h1>Obscura report: {html.escape(cfg.study)}</h1>\n{body}"
        "</body></html>\n"
    )
    md = (
        f"# Obscura report: {cfg.study}\n\n"
        + "\n\n".join(f"## {t}\n\n{m}" for t, _, m in sections)
        + "\n"
    )
    html_path, md_path = folder / "report.html", folder / "report.md"
    atomic_write(html_path, lambda fh: fh.write(page.encode("utf-8")))
    atomic_write(md_path, lambda fh: fh.write(md.encode("utf-8")))
    print(f"Report: {html_path} and {md_path}")
    return html_path, md_path
