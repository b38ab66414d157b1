"""Run inside the built image (``buildah run``): one real stage of the demo to a result.

``selftrain data generate`` writes a tiny PartWorld, then the stage runs the way a PyTorchJob runs it
(``torchrun ... -m trainers fit-objects --spec <file>``), and result.json must say succeeded with a model.
Argument: a writable work directory (mounted from the host).
"""
import json
import subprocess
import sys
from pathlib import Path

work = Path(sys.argv[1])
(work / "world.yaml").write_text(
    "image_size: 32\nnum_classes: 3\nnum_part_types: 4\nmin_parts: 1\nmax_parts: 2\nmax_instances: 2\n"
    "min_object_area: 16\nmax_distractors: 0\ntrain_images: 16\neval_images: 8\n")
subprocess.run(["selftrain", "data", "generate", "-c", str(work / "world.yaml"), "-o", str(work / "data"),
                "--shard-size", "8", "--no-version", "--no-push"], check=True)
spec = {
    "stage": "fit-objects", "name": "image-demo",
    "inputs": {"datasets": {"train": {"path": str(work / "data" / "train")}, "eval": {"path": str(work / "data" / "eval")}},
               "models": {}},
    "outputs": {"workdir": str(work / "stage"), "dataset": None},
    "params": {"steps": 3, "lr": 0.01, "image_size": 32, "width": 16, "checkpoint_every": 3},
    "resources": {"nproc_per_node": 1, "deepspeed": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}},
    "tracking": {"mlflow_uri": f"sqlite:///{work / 'mlflow.db'}", "run_id": None},
}
(work / "spec.json").write_text(json.dumps(spec))
subprocess.run(["torchrun", "--nnodes", "1", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", "29571", "-m", "trainers", "fit-objects", "--spec", str(work / "spec.json")],
               check=True, env={**__import__("os").environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
result = json.loads((work / "stage" / "result.json").read_text())
print(json.dumps(result))
assert result["status"] == "succeeded" and result["steps"] == 3 and Path(result["model_path"]).is_file(), result
