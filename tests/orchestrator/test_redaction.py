"""Printed tensors are kept out of error texts (Ray's error.txt and the recorded error)."""

from __future__ import annotations

import torch

from orchestrator.privacy import purge_private, redact_tensors


def test_printed_tensor_values_are_withheld_and_the_rest_kept(tmp_path) -> None:
    pixels = torch.tensor([[0.123456, 0.654321], [0.5, 0.25]])
    text = f"ValueError: bad batch {pixels!r} on {pixels.numpy()!r}\nat line 3"
    clean = redact_tensors(text)
    assert "0.1235" not in clean and "0.6543" not in clean
    assert clean.startswith("ValueError: bad batch tensor(<values withheld>) on array(")
    assert clean.endswith("\nat line 3")
    assert redact_tensors("no tensors here") == "no tensors here"
    trial = tmp_path / "ray" / "run" / "trial"
    trial.mkdir(parents=True)
    (trial / "error.txt").write_text(text)
    purge_private(tmp_path / "ray")
    assert "0.1235" not in (trial / "error.txt").read_text()
