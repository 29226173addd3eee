"""Continuous adaptation: a data schedule of phases (schedule.py), per-phase held-out scores
(phases.py), the continual-learning metrics of an accuracy matrix (metrics.py) and the EWC / FedCurv
remedy (ewc.py)."""
