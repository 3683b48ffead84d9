"""The machinery the optimisation attacks share (private: no stable API).

- :mod:`attacks._machinery.setup`: what an inversion derives from an observation (matched
  parameters, targets, the input box, dummy batches);
- :mod:`attacks._machinery.objectives`: dummy gradients and the gradient distances;
- :mod:`attacks._machinery.matching`: the matched quantity (dummy gradient or unrolled FedAvg
  update);
- :mod:`attacks._machinery.optim`: the optimisation loops, with clean stops on divergence;
- :mod:`attacks._machinery.convolution`: the exact, leaner convolution double backward.
"""
