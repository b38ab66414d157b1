"""The contract between the two planes (docs/architecture.md "The contract").

Torch-free and small: the stage spec (``contract.spec``), the stage definitions and their typed
params (``contract.stages``), model resolution (``contract.models``) and atomic file IO
(``contract.io``). ``pipelines`` (control plane) and ``trainers`` (data plane) both import it;
it imports neither.
"""
