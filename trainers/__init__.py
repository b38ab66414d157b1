"""selftrain data plane: the programs a PyTorchJob runs (train, mine, pseudo-label, cluster, evaluate).

Never talks to Kubernetes, never decides what runs next. Entry point: ``python -m trainers <stage> --spec <file>``.
"""
