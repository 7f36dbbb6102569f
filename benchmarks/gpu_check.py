"""One GPU check of every stage the GPU is meant to speed up, printed as JSON lines.

Runs without Ray, cuML or network (what a bare GPU machine has): each section times the same code the Ray
actors and workers run, in one process. A section whose library is missing prints ``{"skipped": reason}``
and the rest go on. Random-init DINOv2 weights are used: speed does not depend on the weights, and a GPU box
without network cannot fetch real ones.

Sections
--------
decode   nvJPEG batch decode + GPU resize (``gpudecode.decode_images``) against PIL on one core and on all cores.
embed    ``Embedder.__call__`` on real JPEG bytes (nvJPEG decode + bf16 forward, what the actor does) against
         ``Embedder.embed`` on images already on the GPU (the model-only rate); their ratio; bf16 vs fp32 features.
umap     cuML UMAP and umap-learn fit + transform on the same synthetic N x 384 sample (time, trustworthiness).
dpgmm    the DP-GMM on CUDA (float64 and float32) and on the CPU from the same initial responsibilities, same
         iterations: lower bounds and seconds, 1M x 10, K = 50; then a full CUDA fit to convergence.
finetune one fine-tuning step of the Ray Train worker's model (SceneClassifier, bf16 autocast, AdamW) with the
         batch already on the GPU, and with the worker's CPU augmentation in front of it.

    python benchmarks/gpu_check.py --images DIR [--sections decode embed umap dpgmm finetune]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardware import cpu_model  # noqa: E402

_OUT: list[dict] = []
DEVICE = "cuda"  # --cpu-dry-run sets "cpu": the whole script runs small on a CPU before it costs GPU time


def emit(section: str, **fields) -> None:
    """Print one JSON line (and keep it for the summary file)."""
    row = {"section": section, **fields}
    _OUT.append(row)
    print(json.dumps(row, default=str), flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Seconds per call of ``fn`` (GPU work synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def load_blobs(folder: Path, limit: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    if not files:
        raise SystemExit(f"no JPEGs under {folder}")
    return [p.read_bytes() for p in files]


def random_backbone_folder(tmp: Path, size: str = "small") -> str:
    """A random-init DINOv2 ViT-S/14 (or B/14) saved as a transformers folder, loaded like real weights."""
    from transformers import Dinov2Model

    from scenecluster.models import dinov2_small_config, save_backbone

    cfg = dinov2_small_config()
    if size == "base":
        cfg.hidden_size, cfg.num_attention_heads = 768, 12
    torch.manual_seed(0)
    return str(save_backbone(Dinov2Model(cfg), tmp / f"dinov2-{size}-random"))


# ------------------------------------------------------------------------------------------------ sections
def _pil_decode(blob: bytes) -> np.ndarray:
    from scenecluster.data import decode_image

    return decode_image(blob, 224)


def check_decode(blobs: list[bytes], image_size: int) -> None:
    from scenecluster.gpudecode import decode_images, gpu_decode_available

    device = torch.device(DEVICE)
    sample = blobs[:256]
    start = time.perf_counter()
    for b in sample:
        _pil_decode(b)
    pil_one = len(sample) / (time.perf_counter() - start)
    procs = os.cpu_count() or 1
    with Pool(procs) as pool:
        pool.map(_pil_decode, blobs[:procs], chunksize=1)  # start the workers
        start = time.perf_counter()
        pool.map(_pil_decode, blobs, chunksize=16)
        pil_all = len(blobs) / (time.perf_counter() - start)
    if not gpu_decode_available(device):
        emit("decode", pil_1core_img_s=round(pil_one), pil_all_cores_img_s=round(pil_all), skipped="no torchvision")
        return
    batch = 512
    batches = [blobs[i : i + batch] for i in range(0, len(blobs), batch)]

    def run() -> None:
        for b in batches:
            decode_images(b, np.array([""] * len(b), dtype=object), image_size, device=device)

    seconds = timed(run, repeats=3)
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [[torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in b] for b in batches]

    def raw() -> None:  # nvJPEG alone: no copies into bytearrays, no resize, no output buffer
        for t in tensors:
            decode_jpeg(t, mode=ImageReadMode.RGB, device=device)

    raw_seconds = timed(raw, repeats=3)
    emit(
        "decode",
        images=len(blobs),
        mean_jpeg_bytes=int(np.mean([len(b) for b in blobs])),
        image_size=image_size,
        nvjpeg_img_s=round(len(blobs) / seconds),
        nvjpeg_decode_only_img_s=round(len(blobs) / raw_seconds),
        pil_1core_img_s=round(pil_one),
        pil_all_cores_img_s=round(pil_all),
        cores=procs,
        nvjpeg_over_pil_all_cores=round(len(blobs) / seconds / pil_all, 2),
    )


def check_embed(blobs: list[bytes], image_size: int, tmp: Path, batch_size: int) -> None:
    from scenecluster.embed import Embedder

    for size in ("small", "base"):
        folder = random_backbone_folder(tmp, size)
        emb = Embedder.for_model(folder, device=DEVICE, image_size=image_size)
        images = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, device=DEVICE)
        forward_s = timed(lambda emb=emb, images=images: emb.embed(images), repeats=10, warmup=2)
        batches = [blobs[i : i + batch_size] for i in range(0, len(blobs) - batch_size + 1, batch_size)]

        def actor(emb=emb, batches=batches) -> None:
            for b in batches:
                emb({"path": np.array(["x"] * len(b)), "error": np.array([""] * len(b), dtype=object), "bytes": b})

        actor_s = timed(actor, repeats=2)
        n_actor = sum(len(b) for b in batches)
        row = {
            "model": f"ViT-{size[0].upper()}/14 random init",
            "dtype": str(emb.dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "image_size": image_size,
            "forward_only_img_s": round(batch_size / forward_s),
            "jpeg_bytes_to_features_img_s": round(n_actor / actor_s),
            "ratio_actor_over_forward": round((n_actor / actor_s) / (batch_size / forward_s), 3),
        }
        if size == "small":  # bf16 against fp32 features of the same images
            ref = Embedder.for_model(folder, device=DEVICE, image_size=image_size)
            ref.model, ref.dtype = ref.model.float(), torch.float32
            real = emb._decode(batches[0], np.array([""] * len(batches[0]), dtype=object))[0]
            a, b = emb.embed(real), ref.embed(real)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            row.update(
                bf16_fp32_cosine_mean=round(float(cos.mean()), 5),
                bf16_fp32_cosine_min=round(float(cos.min()), 5),
                fp32_forward_img_s=round(batch_size / timed(lambda ref=ref, im=images: ref.embed(im), repeats=5)),
            )
        emit("embed", **row)
        del emb
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _blobs_384(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, 384)).astype(np.float32)
    labels = rng.integers(20, size=n)
    return centers[labels] + 0.6 * rng.normal(size=(n, 384)).astype(np.float32)


def check_umap(n: int, n_new: int) -> None:
    import importlib.util

    from sklearn.manifold import trustworthiness

    from scenecluster.reduce import make_umap

    X = _blobs_384(n, 0)
    X_new = _blobs_384(n_new, 1)
    sub = np.random.default_rng(0).choice(n, size=min(n, 5000), replace=False)
    for backend, module in (("cuml", "cuml"), ("umap-learn", "umap")):
        if importlib.util.find_spec(module) is None:
            emit("umap", backend=backend, n=n, skipped=f"{module} is not installed here")
            continue
        reducer = make_umap(5, backend=backend)
        start = time.perf_counter()
        Y = reducer.fit_transform(X)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        reducer.transform(X_new)
        transform_s = time.perf_counter() - start
        Y = Y.get() if hasattr(Y, "get") else np.asarray(Y)
        emit(
            "umap",
            backend=backend,
            n=n,
            d=384,
            n_components=5,
            fit_s=round(fit_s, 2),
            transform_s=round(transform_s, 2),
            n_transform=n_new,
            trustworthiness_5k=round(float(trustworthiness(X[sub], Y[sub], n_neighbors=10)), 4),
            note="umap-learn with random_state runs single-threaded (its own rule); first fit includes numba JIT",
        )


def check_dpgmm(n: int, iters: int) -> None:
    from bench_dpgmm import make_data

    from scenecluster.cluster import DPGMM

    X = make_data(n, 10, 20)
    DPGMM(5, max_iter=2, device=DEVICE).fit(X[:2000])  # warm-up (CUDA context, kernels)
    init = DPGMM(50, max_iter=0, random_state=0, device=DEVICE).fit(X)
    resp = np.zeros((n, 50))
    resp[np.arange(n), init.labels_] = 1.0
    torch.set_num_threads(os.cpu_count() or 1)
    for device, dtype in ((DEVICE, "float64"), (DEVICE, "float32"), ("cpu", "float64")):
        model = DPGMM(50, max_iter=iters, tol=0.0, random_state=0, device=device, dtype=dtype)
        start = time.perf_counter()
        model._fit_from_resp(X, resp)
        sync()
        seconds = time.perf_counter() - start
        emit(
            "dpgmm",
            mode="same init, fixed iterations",
            device=device,
            dtype=dtype,
            torch_threads=torch.get_num_threads() if device == "cpu" else None,
            n=n,
            d=10,
            k=50,
            iters=iters,
            seconds=round(seconds, 3),
            s_per_iter=round(seconds / iters, 4),
            lower_bound=model.lower_bound_,
            n_clusters=int(model.n_clusters_),
        )
    model = DPGMM(50, max_iter=500, tol=1e-3, random_state=0, device=DEVICE)
    start = time.perf_counter()
    model.fit(X)
    sync()
    emit(
        "dpgmm",
        mode="full fit (k-means init) to tol 1e-3",
        device=DEVICE,
        dtype="float32",
        n=n,
        seconds=round(time.perf_counter() - start, 2),
        n_iter=int(model.n_iter_),
        converged=bool(model.converged_),
        n_clusters=int(model.n_clusters_),
        true_clusters=20,
    )


def check_finetune(tmp: Path, image_size: int, batch_size: int, steps: int) -> None:
    from scenecluster.augment import augment_batch, normalize, to_tensor
    from scenecluster.models import load_backbone
    from scenecluster.train_recipe import SceneClassifier, param_groups

    device = torch.device(DEVICE)
    model = SceneClassifier(load_backbone(random_backbone_folder(tmp, "small")), [12]).to(device)
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 0.05, 0.75), betas=(0.9, 0.999))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    labels = torch.as_tensor(rng.integers(0, 12, batch_size), device=device)
    gen = torch.Generator().manual_seed(0)
    on_gpu = normalize(to_tensor(torch.as_tensor(images, device=device)))

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x)[0].float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    gpu_only = timed(lambda: step(on_gpu), repeats=steps, warmup=3)
    with_cpu_aug = timed(lambda: step(augment_batch(images, gen).to(device)), repeats=max(2, steps // 4))
    aug_only = timed(lambda: augment_batch(images, gen), repeats=2)
    on_device = torch.as_tensor(images)
    with_gpu_aug = timed(lambda: step(augment_batch(on_device.to(device), gen)), repeats=max(2, steps // 2))
    emit(
        "finetune",
        model="ViT-S/14 random init + 1 head",
        image_size=image_size,
        batch_size=batch_size,
        autocast="bf16",
        torch_threads=torch.get_num_threads(),
        step_gpu_batch_img_s=round(batch_size / gpu_only),
        step_with_cpu_augment_img_s=round(batch_size / with_cpu_aug),
        cpu_augment_only_img_s=round(batch_size / aug_only),
        step_with_device_augment_img_s=round(batch_size / with_gpu_aug),
        note="no Ray on the GPU box: one process stands for one Ray Train worker",
    )


def check_parts(folder: Path, image_size: int, tmp: Path, batch_size: int) -> None:
    """The job's embedding actor (``PartEmbedder``) on whole parts read from disk, and the assignment maths on
    the GPU: DP-GMM ``predict_proba`` + ``score_samples`` of 1M projected rows."""
    import pyarrow.fs as pafs

    from scenecluster.devices import ClusterInventory, decide
    from scenecluster.features import resolve_feature_spec
    from scenecluster.outputs import OutputFolder
    from scenecluster.scale import PartEmbedder

    spec = resolve_feature_spec(random_backbone_folder(tmp, "small"), image_size=image_size)
    resources = decide(DEVICE, ClusterInventory(16, 1 if DEVICE == "cuda" else 0, 16), torch_threads=4)
    out = OutputFolder(str(tmp / "run"))
    actor = PartEmbedder(spec, out, pafs.LocalFileSystem(), resources, batch_size=batch_size, with_labels=True)
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    parts = [files[i : i + 512] for i in range(0, len(files), 512)]
    actor({"name": np.array(["warm"]), "sources": np.array([parts[0][:batch_size]], dtype=object)})
    start = time.perf_counter()
    for i, sources in enumerate(parts):
        actor({"name": np.array([f"part-{i:06d}"]), "sources": np.array([sources], dtype=object)})
    sync()
    seconds = time.perf_counter() - start
    emit(
        "parts",
        what="PartEmbedder: read (8 threads) + decode + embed + write parquet, parts of 512",
        device=DEVICE,
        decode_on_gpu=resources.decode_on_gpu,
        images=len(files),
        img_s=round(len(files) / seconds),
    )

    from bench_dpgmm import make_data

    from scenecluster.cluster import DPGMM

    X = make_data(1_000_000, 5, 12)
    model = DPGMM(50, max_iter=100, random_state=0, device=DEVICE).fit(X[:100_000])
    model.predict_proba(X[:1000])
    start = time.perf_counter()
    model.predict_proba(X)
    model.score_samples(X)
    sync()
    emit(
        "parts",
        what="DP-GMM predict_proba + score_samples, 1M x 5, K=50",
        device=DEVICE,
        rows_s=round(len(X) / (time.perf_counter() - start)),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of real JPEG scenes")
    p.add_argument("--max-images", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--umap-n", type=int, default=100_000)
    p.add_argument("--dpgmm-n", type=int, default=1_000_000)
    p.add_argument("--dpgmm-iters", type=int, default=20)
    p.add_argument("--finetune-batch", type=int, default=128)
    p.add_argument("--finetune-steps", type=int, default=12)
    p.add_argument("--sections", nargs="+", default=["decode", "embed", "dpgmm", "finetune", "umap"])
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.jsonl")
    p.add_argument("--cpu-dry-run", action="store_true", help="run every section on the CPU (pass small sizes)")
    args = p.parse_args()
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; torch sees none (--cpu-dry-run tries the script on the CPU)")
    emit(
        "machine",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(0) if DEVICE == "cuda" else None,
        gpu_mem_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if DEVICE == "cuda" else None,
        cpu=cpu_model(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        python=sys.version.split()[0],
    )
    blobs = load_blobs(Path(args.images), args.max_images)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        runs = {
            "decode": lambda: check_decode(blobs, args.image_size),
            "embed": lambda: check_embed(blobs, args.image_size, Path(tmp), args.batch_size),
            "umap": lambda: check_umap(args.umap_n, 10_000),
            "parts": lambda: check_parts(Path(args.images), args.image_size, Path(tmp), args.batch_size),
            "dpgmm": lambda: check_dpgmm(args.dpgmm_n, args.dpgmm_iters),
            "finetune": lambda: check_finetune(Path(tmp), args.image_size, args.finetune_batch, args.finetune_steps),
        }
        for name in args.sections:
            start = time.perf_counter()
            try:
                runs[name]()
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others' figures
                emit(name, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=4))
            emit(name, section_seconds=round(time.perf_counter() - start, 1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in _OUT))


if __name__ == "__main__":
    main()
