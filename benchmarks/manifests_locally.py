"""Apply the checked-in stage manifests one by one, as ``kubectl apply`` would, and compare with ``selftrain run``.

Every file of ``manifests/pipeline/`` runs, in its numbered order, through the local executor (the
PyTorchJob interpreted on this machine, its PVCs mapped to local folders, the cluster's MLflow Service
played by a local ``mlflow server``): no driver is involved. The only change to a file is the MLflow
address. Then the registered models, their aliases, the DVC versions of the datasets written and every
stage's metrics are compared with a ``selftrain run`` of the same pipeline (``--reference``: its
workspace, e.g. the ``.selftrain`` folder of ``selftrain run configs/partdistillation-demo.yaml``).

    python benchmarks/manifests_locally.py --data data --reference .selftrain --reference-run <run> -o /tmp/manifests-run

Prints a comparison table; exits 1 when anything differs (timings excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contract.io import free_port  # noqa: E402
from pipelines.executors.local import LocalExecutor  # noqa: E402
from pipelines.render import load_manifest  # noqa: E402

TIMING = ("second", "per_second", "wall", "share_outside", "time")


def mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def run_manifests(manifests: Path, data: Path, out: Path, uri: str) -> dict[str, dict]:
    """Run every manifest in order; returns stage name -> its stage.json marker."""
    ckpt = out / "pvc-checkpoints"
    markers = {}
    for path in sorted(manifests.glob("[0-9][0-9]-*.yaml")):
        job = load_manifest(path)
        for rs in job["spec"]["pytorchReplicaSpecs"].values():
            for e in rs["template"]["spec"]["containers"][0]["env"]:
                if e["name"] == "SELFTRAIN_SPEC":
                    spec = json.loads(e["value"])
                    spec["tracking"]["mlflow_uri"] = uri  # the only change: where the MLflow Service is
                    e["value"] = json.dumps(spec)
                elif e["name"] == "MLFLOW_TRACKING_URI":
                    e["value"] = uri
        t0 = time.perf_counter()
        LocalExecutor(volumes={"selftrain-data": data, "selftrain-checkpoints": ckpt}).run(job, log_dir=out / "logs" / path.stem)
        workdir = ckpt / Path(spec["outputs"]["workdir"]).relative_to("/checkpoints")
        markers[spec["name"]] = {**json.loads((workdir / "stage.json").read_text()), "workdir": str(workdir)}
        print(f"{path.name}: {markers[spec['name']]['status']} in {time.perf_counter() - t0:.0f} s", flush=True)
    return markers


def registry(uri: str) -> dict[str, dict]:
    """Registered model -> {versions: [(version, stage)], aliases: {alias: version}}."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = {}
    for m in c.search_registered_models():
        versions = sorted((int(v.version), v.tags.get("selftrain.stage", "")) for v in c.search_model_versions(f"name='{m.name}'"))
        out[m.name] = {"versions": versions, "aliases": dict(sorted((a, int(v)) for a, v in (m.aliases or {}).items()))}
    return out


def stage_facts(workdir: Path, marker: dict) -> dict:
    result = json.loads((workdir / "result.json").read_text())
    metrics = {k: v for k, v in (result.get("metrics") or {}).items() if not any(t in k for t in TIMING)}
    return {"output_hash": marker.get("output_hash"), "metrics": metrics}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifests", type=Path, default=REPO / "manifests" / "pipeline")
    ap.add_argument("--data", type=Path, required=True, help="the data PVC's contents (holds partworld-demo/train, eval)")
    ap.add_argument("--reference", type=Path, required=True, help="workspace of a selftrain run of the same pipeline (.selftrain)")
    ap.add_argument("--reference-run", required=True)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    (args.out / "mlflow").mkdir(exist_ok=True)
    server, uri = mlflow_server(args.out / "mlflow")
    try:
        t0 = time.perf_counter()
        markers = run_manifests(args.manifests, args.data.resolve(), args.out, uri)
        print(f"all manifests: {(time.perf_counter() - t0) / 60:.1f} min")
        mine = registry(uri)
    finally:
        server.terminate()
    ref_runs = args.reference / "runs" / args.reference_run
    theirs = registry(f"sqlite:///{(args.reference / 'mlflow' / 'mlflow.db').resolve()}")
    diffs = []
    if mine != theirs:
        diffs.append(f"registry differs:\n  manifests: {mine}\n  selftrain run: {theirs}")
    rows = []
    for name, marker in markers.items():
        a = stage_facts(Path(marker["workdir"]), marker)
        ref_marker = json.loads((ref_runs / name / "stage.json").read_text())
        b = stage_facts(ref_runs / name, ref_marker)
        same_hash = a["output_hash"] == b["output_hash"]
        diff_metrics = sorted(k for k in set(a["metrics"]) | set(b["metrics"]) if a["metrics"].get(k) != b["metrics"].get(k))
        rows.append(f"| {name} | {a['output_hash'] or '-'} | {'same' if same_hash else 'DIFFERENT'} | {len(b['metrics'])} | {len(diff_metrics)} |")
        if not same_hash or diff_metrics:
            diffs.append(f"{name}: dataset {a['output_hash']} vs {b['output_hash']}; metrics differing: {diff_metrics}")
    print("| stage | DVC version written | vs selftrain run | metrics | differing |\n| --- | --- | --- | ---: | ---: |")
    print("\n".join(rows))
    print(f"registered models: {json.dumps(mine)}")
    print("RESULT: " + ("identical" if not diffs else "DIFFERENT\n" + "\n".join(diffs)))
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
