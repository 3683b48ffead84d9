"""Federated-learning core of Obscura: datasets, models and the in-process FL simulator.

Sub-packages:

- :mod:`fl.data` -- dataset registry (MedMNIST, torchvision, image folders) and client partitioning.
- :mod:`fl.models` -- model registry; every model exposes its feature/classifier split.
- :mod:`fl.simulation` -- FedSGD / FedAvg simulation with observation capture for attacks.
"""
