"""`lopd demo`: the whole consistent-teacher pipeline in miniature, on CPU, with the real stages.

What runs (every model is a tiny Qwen3 built here; see `task.py` for the task):

    task           tokenizer, problem sets, reference solutions (styles A and B), random models
    teacher_a/b    the project's SFT trainer on reference solutions in style A / style B
    sft_data  ┐    the pipeline's stages (`pipeline.build_stages`), run with the tiny config:
    sft       │    teacher A writes SFT data (transformers backend);
    rollouts  │    SFT of the base student gives R; R writes rollouts; teacher A scores them
    score     │    into the store; Lightning OPD (the paper's loss) from R; export to HF;
    train     │    evaluation of the exported student
    export    │
    eval      ┘
    lightning_topk     Lightning OPD from the same R and store, top-k reverse KL loss
    score_teacher_b    teacher B scores the same rollouts into a second store
    offline_teacher_b  offline OPD on that store (the consistency ablation; opted out loudly)
    residualize_teacher_b  the consistency meter on both stores; teacher B's store corrected
                       for style (`store.style`, after Lightning OPD 2.0)
    offline_teacher_b_residualized  offline OPD on the corrected store (accepted, no opt-out)
    online             standard OPD: fresh student samples every step, teacher A scores live
    continued_sft      R trained further on the SFT data (reference row)
    report             report.md, the plot, summary.json

After each model-producing stage the model is measured on the held-out problems: greedy
pass@1 (the evaluation package, regex grader), pass@1 of one T=1 sample, and the
per-token KL of the model's T=1 samples to teacher A. Training runs save a checkpoint
every `curve_every` steps; those give the accuracy / KL curves of the plot.

State lives in `DIR/work/state.json` (one record per finished stage: seconds and
results). `resume=True` continues from the last finished stage (pipeline stages also
resume inside, from their own checkpoints and chunks); `overwrite=True` starts over.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_lopd.demo import task
from megatron_lopd.demo.lanes import Stage, default_jobs, prepare_process, run_plan
from megatron_lopd.demo.report import SUMMARY_NAME
from megatron_lopd.errors import ConfigError

STATE_VERSION = 1

# What each student variant trained from the same R is; "lightning" is the pipeline's own train stage.
VARIANT_KINDS = {
    "lightning": "Lightning OPD",
    "lightning_topk": "Lightning OPD",
    "offline_teacher_b": "offline OPD, teacher B's scores",
    "offline_teacher_b_residualized": "offline OPD, teacher B's scores style-residualized",
    "online": "standard online OPD, teacher A live",
    "continued_sft": "continued SFT from R",
}
# The runs made once per comparison loss; a longer name first (it starts with a shorter one).
COMPARISON_BASES = ("offline_teacher_b_residualized", "offline_teacher_b", "online")
LOSS_LABELS = {"lightning_opd": "paper loss", "topk_reverse_kl": "top-k reverse KL", "topk_forward_kl": "top-k forward KL", "sft": "cross-entropy"}


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention needs >= 32
    intermediate_size: int = 128


@dataclass(frozen=True)
class DemoSizes:
    """Everything that sets the demo's scale and its results. The defaults are the README's demo
    (about 6 min on 2 CPU cores); `tiny()` is a seconds-long version for tests (it shows
    nothing about the method).

    Why these numbers (measured on 2 cores, one thread per stage): the teachers are given
    models, as in the paper, so their seeds come from `teacher_seed`, not from the demo's seed
    (which varies everything on the student's side: R's initialisation, the SFT data's samples,
    the rollouts, every training run's data order). Teacher training is not robust to every
    seed (earlier sizes: one of three seeds stalled at 6 %; at 300 steps, four seeds gave 5-86 %),
    which is one more reason to fix it: at teacher_seed 0, 400 steps of lr 5e-3 give 99.4 % (A)
    and 99.6 % (B) greedy with style A's answer-equivalent paths left at T=1; the report flags
    a teacher below 90 % (`report.TEACHER_FLOOR`). R is trained past the steep part of its SFT
    curve on a small SFT set (1000 answers), which leaves it well below the teacher; the OPD
    runs make one pass over rollouts of fresh prompts (opd_steps x batch), so no rollout is
    fitted twice. Time: the chain task -> teacher A -> SFT data -> R is the critical path; the
    rest fills two lanes."""

    teacher_problems: int = 12800  # reference solutions each teacher is trained on
    sft_prompts: int = 1000  # prompts teacher A answers for SFT
    opd_prompts: int = 6400  # prompts R answers once: one pass of the OPD runs
    eval_problems: int = 500  # held-out problems (greedy pass@1)
    kl_prompts: int = 200  # held-out prompts for sampled pass@1 and the KL to teacher A
    teacher_steps: int = 400
    teacher_lr: float = 5e-3
    teacher_seed: int = 0  # the teachers' initialisation and data order, whatever the demo's seed
    sft_steps: int = 400
    sft_lr: float = 3e-3
    opd_steps: int = 100
    opd_lr: float = 3e-4
    continued_sft_lr: float = 3e-4
    batch: int = 64  # sequences per optimizer step, every training run
    top_k: int = 8  # teacher top-k stored per position
    temperature: float = 1.0  # SFT data, rollouts, online samples
    max_tokens: int = 48  # the longest solution is 42 characters + EOS
    curve_every: int = 25  # checkpoint interval of the OPD runs (points of the curves)
    comparison_losses: tuple[str, ...] = ("topk_reverse_kl",)  # losses of the teacher-B runs (plain and residualized)
    online_losses: tuple[str, ...] = ("lightning_opd", "topk_reverse_kl")  # losses of the standard online OPD runs
    teacher: ModelShape = ModelShape()
    student: ModelShape = ModelShape()

    @classmethod
    def tiny(cls) -> "DemoSizes":
        return cls(
            teacher_problems=128, sft_prompts=64, opd_prompts=64, eval_problems=32, kl_prompts=16,
            teacher_steps=6, sft_steps=6, opd_steps=4, batch=16, curve_every=2,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["comparison_losses"], d["online_losses"] = list(self.comparison_losses), list(self.online_losses)
        return d


def comparison_name(base: str, loss: str) -> str:
    """Run name of a comparison run (one of COMPARISON_BASES) for one loss; top-k RKL is the plain name."""
    return base if loss == "topk_reverse_kl" else f"{base}_{loss}"


def variant_names(sizes: DemoSizes) -> list[str]:
    """Variant run names, in report order (teacher-B runs once per comparison loss, online runs once per online loss)."""
    return (
        ["lightning", "lightning_topk"]
        + [comparison_name(base, loss) for base in ("offline_teacher_b", "offline_teacher_b_residualized") for loss in sizes.comparison_losses]
        + [comparison_name("online", loss) for loss in sizes.online_losses]
        + ["continued_sft"]
    )


def variant_base(name: str) -> str:
    """The kind of a variant run (a key of VARIANT_KINDS)."""
    return next((b for b in COMPARISON_BASES if name == b or name.startswith(b + "_")), name)


def variant_loss(name: str) -> str:
    fixed = {"lightning": "lightning_opd", "lightning_topk": "topk_reverse_kl", "continued_sft": "sft"}
    if name in fixed:
        return fixed[name]
    return name[len(variant_base(name)) + 1 :] or "topk_reverse_kl"


def variant_label(name: str) -> str:
    return f"{VARIANT_KINDS[variant_base(name)]} ({LOSS_LABELS[variant_loss(name)]})"


# ---------------------------------------------------------------------------------------
# Paths and state


@dataclass(frozen=True)
class DemoPaths:
    out: Path

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def state(self) -> Path:
        return self.work / "state.json"

    @property
    def tokenizer(self) -> Path:
        return self.work / "tokenizer"

    @property
    def data(self) -> Path:
        return self.work / "data"

    def prompts(self, split: str) -> Path:
        return self.data / f"{split}_prompts.jsonl"

    @property
    def eval_set(self) -> Path:
        return self.data / "eval.jsonl"

    def solutions(self, style: str) -> Path:
        return self.data / f"solutions_{style}"

    def init_model(self, name: str) -> Path:
        return self.work / "models" / name

    def teacher_run(self, style: str) -> Path:
        return self.work / f"teacher_{style.lower()}"

    def teacher(self, style: str) -> Path:
        return self.teacher_run(style) / "hf"

    @property
    def configs(self) -> Path:
        return self.work / "configs"

    @property
    def pipeline(self) -> Path:
        return self.work / "pipeline"

    def variant(self, name: str) -> Path:
        return self.work / "variants" / name

    @property
    def store_b(self) -> Path:
        return self.work / "variants" / "teacher_b_store"

    @property
    def store_b_residualized(self) -> Path:
        return self.work / "variants" / "teacher_b_store_residualized"

    def measure(self, name: str) -> Path:
        return self.work / "measures" / name

    @property
    def logs(self) -> Path:
        return self.work / "logs"


def _atomic_json(path: Path, data: Any) -> None:
    from megatron_lopd.runtime.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of `src` at `dst` made of hard links (a plain copy across file systems); the
    sources are finished models that nothing writes again."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def _derived_seed(seed: int, what: str) -> int:
    """Independent, reproducible seeds per component from the demo's one seed."""
    return int.from_bytes(hashlib.sha256(f"lopd-demo|{seed}|{what}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def prepare_out_dir(out: Path, *, seed: int, sizes: DemoSizes, overwrite: bool, resume: bool) -> dict[str, Any]:
    """Check `out` against the flags; returns the state to continue from (empty for a fresh run)."""
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other", "pass one of them")
    paths = DemoPaths(out)
    exists = out.exists() and (not out.is_dir() or any(out.iterdir()))
    fresh = {"version": STATE_VERSION, "seed": seed, "sizes": sizes.to_dict(), "stages": {}}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory", "choose another --out")
    if not exists:
        if resume:
            raise ConfigError(f"{out}: nothing to resume (no demo there)", "drop --resume to start a new demo")
        return fresh
    if overwrite:
        if out.is_dir() and any(out.iterdir()) and not paths.state.is_file() and not (out / SUMMARY_NAME).is_file():
            raise ConfigError(f"{out}: exists and does not look like a demo directory (no work/state.json)", "choose another --out; --overwrite only replaces demo directories")
        shutil.rmtree(out)
        return fresh
    if not resume:
        raise ConfigError(f"{out}: already exists", "pass --overwrite to start over, --resume to continue it, or choose another --out")
    if not paths.state.is_file():
        raise ConfigError(f"{out}: not a demo directory (no {paths.state.relative_to(out)})", "choose another --out or pass --overwrite")
    state = json.loads(paths.state.read_text())
    if state.get("version") != STATE_VERSION:
        raise ConfigError(f"{paths.state}: written by another demo version", "start over with --overwrite")
    if state.get("seed") != seed:
        raise ConfigError(f"{out}: is a demo with seed {state.get('seed')}, not {seed}", f"resume with --seed {state.get('seed')}, or --overwrite")
    if state.get("sizes") != sizes.to_dict():
        raise ConfigError(f"{out}: was run with other demo sizes", "start over with --overwrite")
    return state


# ---------------------------------------------------------------------------------------
# Measuring a model


@dataclass
class Measurement:
    pass1: float  # greedy pass@1 on the held-out problems
    pass1_stderr: float
    sampled_pass1: float  # one T=1 sample per held-out KL prompt
    kl_to_teacher_a: float | None  # per response token, E_S[log S - log A] on the model's T=1 samples
    response_tokens: float  # mean length of the T=1 samples
    correct: list[int] = field(default_factory=list)  # greedy correctness per problem (for paired differences)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Measurer:
    """Greedy pass@1 through `evaluation.evaluate`, plus sampled pass@1 and KL to teacher A."""

    def __init__(self, demo: "Demo"):
        from megatron_lopd.evaluation import EvalConfig, load_problems
        from megatron_lopd.evaluation.graders import make_grader
        from megatron_lopd.generation.prompts import load_prompt_set, load_tokenizer

        self.demo = demo
        s = demo.sizes
        self.eval_config = EvalConfig(
            samples_per_problem=1, max_tokens=s.max_tokens, temperature=0.0, top_p=1.0, grader="regex",
            answer_pattern=task.ANSWER_PATTERN, backend="hf", batch_samples=4096,
        )
        self.problems = load_problems(demo.paths.eval_set)
        self.kl_problems = self.problems[: s.kl_prompts]
        self.tokenizer = load_tokenizer(demo.paths.tokenizer)
        self.kl_prompt_ids = load_prompt_set(demo.paths.prompts("kl"), self.tokenizer).token_ids
        self.grader = make_grader("regex", answer_pattern=task.ANSWER_PATTERN)
        self._teacher_a = None

    def teacher_a(self):
        from megatron_lopd.generation.backends import load_backend

        if self._teacher_a is None:
            self._teacher_a = load_backend("hf", self.demo.paths.teacher("A"), **HF_OPTIONS)
        return self._teacher_a

    def close(self) -> None:
        if self._teacher_a is not None:
            self._teacher_a.close()
            self._teacher_a = None

    def __call__(self, model_dir: Path, out_dir: Path, *, with_kl: bool = True, progress: bool = False) -> Measurement:
        from megatron_lopd.evaluation import evaluate
        from megatron_lopd.evaluation.evaluate import read_results
        from megatron_lopd.evaluation.graders import grade_response
        from megatron_lopd.artifacts import FINISH_LENGTH
        from megatron_lopd.generation.backends import load_backend
        from megatron_lopd.generation.base import SamplingParams

        backend = load_backend("hf", model_dir, **HF_OPTIONS)
        try:
            summary = evaluate(model_dir, self.problems, config=self.eval_config, backend=backend, out_dir=out_dir, progress=progress)
            records, _ = read_results(out_dir)
            params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=self.demo.sizes.max_tokens, seed=self.demo.seed_of("measure"), record_logprobs=True)
            samples = [per[0] for per in backend.generate(self.kl_prompt_ids, params)]
        finally:
            backend.close()
        correct_sampled = 0
        for problem, sample in zip(self.kl_problems, samples):
            text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            ok = grade_response(self.grader, self.grader.prepare(problem.answer), text).correct
            correct_sampled += ok and sample.finish_reason != FINISH_LENGTH
        tokens = sum(len(s.response_ids) for s in samples)
        kl = None
        if with_kl:
            scored = self.teacher_a().score(self.kl_prompt_ids, [s.response_ids for s in samples], 0)
            kl = float(sum(float(sum(s.logprobs)) - float(sc.token_logprobs.sum()) for s, sc in zip(samples, scored)) / max(tokens, 1))
        return Measurement(
            pass1=summary.avg_at_k,
            pass1_stderr=summary.avg_at_k_stderr,
            sampled_pass1=correct_sampled / len(samples),
            kl_to_teacher_a=kl,
            response_tokens=tokens / len(samples),
            correct=[int(r["correct"]) for r in sorted(records, key=lambda r: r["problem_index"])],
        )


HF_OPTIONS = {"max_batch": 256}  # the transformers backend's rows per batch: tiny models, big batches


# ---------------------------------------------------------------------------------------
# The demo


class Demo:
    """`jobs`: stages run at once (one thread each: the numbers do not depend on it);
    `shared_teachers`: a finished demo with the same sizes whose teachers this one reuses."""

    def __init__(self, out: Path, seed: int, sizes: DemoSizes, state: dict[str, Any], console: Callable[[str], None], progress: bool,
                 *, jobs: int = 1, shared_teachers: Path | None = None):
        self.paths = DemoPaths(out)
        self.seed = seed
        self.sizes = sizes
        self.state = state
        self.console = console
        self.progress = progress
        self.jobs = jobs
        self.shared_teachers = shared_teachers
        self._measurer: Measurer | None = None

    # ------------------------------------------------------------------ helpers
    def seed_of(self, what: str) -> int:
        return _derived_seed(self.seed, what)

    def teacher_seed_of(self, what: str) -> int:
        return _derived_seed(self.sizes.teacher_seed, what)

    @property
    def measurer(self) -> Measurer:
        if self._measurer is None:
            self._measurer = Measurer(self)
        return self._measurer

    def measure(self, name: str, model_dir: Path, *, with_kl: bool = True) -> dict[str, Any]:
        t0 = time.perf_counter()
        m = self.measurer(model_dir, self.paths.measure(name), with_kl=with_kl, progress=self.progress)
        self.console(
            f"    {name}: pass@1 {100 * m.pass1:.1f}% (greedy, SE {100 * m.pass1_stderr:.1f}) | sampled {100 * m.sampled_pass1:.1f}%"
            + (f" | KL to teacher A {m.kl_to_teacher_a:.3f}" if m.kl_to_teacher_a is not None else "")
        )
        return {**m.to_dict(), "eval_seconds": time.perf_counter() - t0}

    def save_state(self) -> None:
        _atomic_json(self.paths.state, self.state)

    # ------------------------------------------------------------------ configs
    def train_config_files(self) -> dict[str, Path]:
        """The tiny trainer configs, as files: the pipeline passes them to `lopd train --config`."""
        s = self.sizes
        common = {
            "model": {"precision": "fp32", "use_te": "false"},
            "data": {"global_batch": s.batch, "seq_length": 64, "micro_batch_size": s.batch, "pack": False, "prefetch": False},
            # A console line every 50 steps: what a lane's log shows and the heartbeat reads (no bars in a file).
            "logging": {"tensorboard": False, "progress": self.progress, "log_every": 50},
        }
        sft = {
            "base": "sft",
            **common,
            "optimizer": {"weight_decay": 0.0},
            "schedule": {"kind": "cosine", "warmup_fraction": 0.05},
            "checkpoint": {"save_every": 0, "keep_last": 1},
        }
        opd = {
            "base": "lightning_opd",
            **common,
            "checkpoint": {"save_every": s.curve_every, "keep_last": 0},
        }
        files = {"sft": self.paths.configs / "sft.json", "opd": self.paths.configs / "opd.json"}
        for name, cfg in (("sft", sft), ("opd", opd)):
            _atomic_json(files[name], cfg)
        return files

    def train_overrides(self, what: str, seed_of: Callable[[str], int] | None = None) -> list[str]:
        seed_of = seed_of or self.seed_of
        return [f"seed={seed_of('megatron/' + what)}", f"data.seed={seed_of('data/' + what)}"]

    def pipeline_config(self):
        from megatron_lopd.pipeline import EvalSettings, GenerateSettings, PipelineConfig, ScoreSettings, TrainSettings

        s, p = self.sizes, self.paths
        files = self.train_config_files()
        # Every generation with the transformers backend: vLLM's engine start-up (~20 s on 2 cores)
        # would sit on the demo's critical path; the pipeline's vLLM stages are tested elsewhere.
        gen = dict(n=1, temperature=s.temperature, top_p=1.0, max_tokens=s.max_tokens, dtype="float32", backend="hf",
                   extra_args=["--chunk-size", "1024"])
        return PipelineConfig(
            work_dir=str(p.pipeline),
            teacher=str(p.teacher("A")),
            base_student=str(p.init_model("base_student")),
            sft_prompts=str(p.prompts("sft")),
            opd_prompts=str(p.prompts("opd")),
            eval_data=str(p.eval_set),
            sft_data=GenerateSettings(**gen, seed=self.seed_of("sft_data")),
            sft=TrainSettings(config=str(files["sft"]), lr=s.sft_lr, steps=s.sft_steps, overrides=dict(o.split("=", 1) for o in self.train_overrides("sft"))),
            rollouts=GenerateSettings(**gen, seed=self.seed_of("rollouts")),
            score=ScoreSettings(top_k=s.top_k, backend="hf", dtype="float32"),
            trainer=TrainSettings(
                config=str(files["opd"]), lr=s.opd_lr, steps=s.opd_steps,
                overrides={"loss": "lightning_opd", **dict(o.split("=", 1) for o in self.train_overrides("lightning"))},
            ),
            eval=EvalSettings(
                samples_per_problem=1, max_tokens=s.max_tokens, temperature=0.0, top_p=1.0, backend="hf", dtype="float32",
                extra_args=["--grader", "regex", "--answer-pattern", task.ANSWER_PATTERN],
            ),
        )

    def run_training(self, overrides: list[str], *, config: str = "opd", online=None):
        """One training run with the project's trainer; `online`: standard OPD's live data stream."""
        from megatron_lopd.training.config import resolve_config
        from megatron_lopd.training.loop import train

        files = self.train_config_files()
        cfg = resolve_config(str(files[config]), overrides)
        if online is None:
            return train(cfg), None
        from megatron_lopd.demo.online import train_online

        return train_online(cfg, online)

    # ------------------------------------------------------------------ stages
    def stage_task(self) -> dict[str, Any]:
        from megatron_lopd.models.tiny import write_random_hf_model

        s, p = self.sizes, self.paths
        tokenizer = task.build_tokenizer(p.tokenizer)
        splits = task.make_splits(self._split_sizes())
        task.write_eval_set(p.eval_set, splits["eval"])
        task.write_prompts(p.prompts("kl"), splits["eval"][: s.kl_prompts])
        for split in ("teacher", "sft", "opd"):
            task.write_prompts(p.prompts(split), splits[split])
        vocab = 32 if len(tokenizer) <= 32 else len(tokenizer)
        models = {"teacher_a_init": s.teacher, "teacher_b_init": s.teacher, "base_student": s.student}
        for name, shape in models.items():
            seed_of = self.teacher_seed_of if name.startswith("teacher") else self.seed_of
            write_random_hf_model(
                p.init_model(name), seed=seed_of("init/" + name), tokenizer=tokenizer, vocab_size=vocab,
                max_position_embeddings=128, **dataclasses.asdict(shape),
            )
        for style in task.STYLES:
            task.write_solutions(p.solutions(style), p.prompts("teacher"), splits["teacher"], style, p.init_model("teacher_a_init"))
        return {"problems": {k: len(v) for k, v in splits.items()}, "vocab_size": vocab, "example": {
            "prompt": splits["eval"][0].prompt, **{f"style_{st}": task.reference_solution(splits["eval"][0], st) for st in task.STYLES}}}

    def stage_teacher(self, style: str) -> dict[str, Any]:
        s, p = self.sizes, self.paths
        t0 = time.perf_counter()
        source = self.shared_teacher(style)
        if source is not None:  # the same teacher, trained by another seed's demo: linked, not retrained
            _link_tree(source.teacher_run(style), p.teacher_run(style))
            record = {"shared_from": str(source.out), "train_seconds": 0.0}
        else:
            init = p.init_model(f"teacher_{style.lower()}_init")
            self.run_training([
                f"model.start_from={init}", f"data.sft_data={p.solutions(style)}", f"run_dir={p.teacher_run(style)}",
                f"train_steps={s.teacher_steps}", f"optimizer.lr={s.teacher_lr}", "schedule.warmup_fraction=0.1",
                "checkpoint.export_hf=true", *self.train_overrides(f"teacher_{style}", self.teacher_seed_of),
            ], config="sft")
            record = {"train_seconds": time.perf_counter() - t0}
        # Teacher B writes another style: its KL to teacher A says nothing, skip it.
        return {**record, "measure": self.measure(f"teacher_{style.lower()}", p.teacher(style), with_kl=style == "A")}

    def shared_teacher(self, style: str) -> DemoPaths | None:
        """`shared_teachers`' paths when it finished this teacher with the same sizes (so the same teacher seed)."""
        if self.shared_teachers is None:
            return None
        source = DemoPaths(Path(self.shared_teachers))
        try:
            state = json.loads(source.state.read_text())
        except (OSError, ValueError):
            return None
        done = f"teacher_{style.lower()}" in state.get("stages", {}) and (source.teacher(style) / "config.json").is_file()
        return source if done and state.get("sizes") == self.sizes.to_dict() else None

    def stage_base(self) -> dict[str, Any]:
        return {"measure": self.measure("base_student", self.paths.init_model("base_student"))}

    def run_pipeline_stage(self, name: str, config=None) -> dict[str, Any]:
        """One stage of `pipeline.build_stages` (of `config`, default the demo's), through the
        pipeline's runner: skipped when its output verifies (a resumed demo), else its `lopd`
        commands run in this process."""
        from megatron_lopd.pipeline import build_stages, lopd_in_process, run_stage

        config = config or self.pipeline_config()
        stage = next(st for st in build_stages(config) if st.name == name)
        def in_process(args: list[str]) -> int:
            return lopd_in_process([a for a in args if a != "--no-progress" or not self.progress])

        t0 = time.perf_counter()
        result = run_stage(stage, echo=lambda _line: None, execute=in_process)
        return {"seconds_stage": time.perf_counter() - t0, "detail": result.detail, "outputs": {k: str(v) for k, v in stage.outputs.items()}}

    def curve(self, name: str, run_dir: Path, final_measure: dict[str, Any], *, start: dict[str, Any] | None = None,
              steps: int | None = None) -> list[dict[str, Any]]:
        """Accuracy and KL to teacher A at step 0 (`start`, default R), each saved checkpoint, and the end (`steps`)."""
        from megatron_lopd.models.checkpoint import convert_to_hf
        from megatron_lopd.training.checkpointing import read_metadata

        r = start or self.state["stages"]["sft"]["measure"]
        steps = steps or self.sizes.opd_steps
        points = [{"step": 0, "pass1": r["pass1"], "sampled_pass1": r["sampled_pass1"], "kl_to_teacher_a": r["kl_to_teacher_a"]}]
        ckpts = sorted(d for d in (run_dir / "checkpoints").glob("step_*") if d.is_dir() and not d.name.endswith(".partial"))
        final_step = None
        for ckpt in ckpts:
            step = int(read_metadata(ckpt)["iteration"])
            if step >= steps:
                final_step = step
                continue
            hf = self.paths.work / "curves" / name / f"step_{step}"
            if hf.exists():
                shutil.rmtree(hf)
            convert_to_hf(ckpt, hf)
            m = self.measurer(hf, self.paths.measure(f"{name}_step{step}"), progress=False)
            points.append({"step": step, "pass1": m.pass1, "sampled_pass1": m.sampled_pass1, "kl_to_teacher_a": m.kl_to_teacher_a})
        points.append({"step": final_step or steps, "pass1": final_measure["pass1"], "sampled_pass1": final_measure["sampled_pass1"],
                       "kl_to_teacher_a": final_measure["kl_to_teacher_a"]})
        return points

    def training_log(self, run_dir: Path) -> list[dict[str, Any]]:
        from megatron_lopd.training.metrics_log import read_metrics

        keep = ("step", "loss", "kl_to_teacher", "reverse_kl", "top1_agreement", "drift_chi2", "drift_kl", "step_time_s")
        return [{k: r.get(k) for k in keep} for r in read_metrics(run_dir)]

    def finish_variant(self, name: str, run_dir: Path, final_model: Path, train_seconds: float, extra: dict[str, Any],
                       **curve: Any) -> dict[str, Any]:
        """The final model measured, its curve (`curve`: `Demo.curve`'s start and steps), the training log."""
        t0 = time.perf_counter()
        measure = self.measure(name, final_model)
        return {
            "train_seconds": train_seconds,
            "measure": measure,
            "curve": self.curve(name, run_dir, measure, **curve),
            "curve_seconds": time.perf_counter() - t0 - measure["eval_seconds"],
            "metrics": self.training_log(run_dir),
            **extra,
        }

    def stage_lightning_eval(self) -> dict[str, Any]:
        """The pipeline's eval stage, then the demo's own measurements of the same model."""
        result = self.run_pipeline_stage("eval")
        pipe = self.paths.pipeline
        train = self.state["stages"]["train"]
        out = self.finish_variant("lightning", pipe / "opd", pipe / "student_hf", train["seconds_stage"], {
            "loss": "lightning_opd", "data": "teacher A store", "pipeline_eval": result["detail"],
            "teacher_forward_tokens": self.state["stages"]["score"]["teacher_forward_tokens"]})
        out["seconds_stage"] = result["seconds_stage"]
        return out

    def stage_score_info(self) -> dict[str, Any]:
        from megatron_lopd.store import inspect_store

        result = self.run_pipeline_stage("score")
        summary = inspect_store(self.paths.pipeline / "teacher_store")
        return {**result, "teacher_forward_tokens": summary.prompt_tokens + summary.response_tokens,
                "response_tokens": summary.response_tokens, "store_bytes": summary.nbytes, "bytes_per_token": summary.bytes_per_token,
                "top_k": summary.top_k}

    def stage_artifact_info(self, name: str) -> dict[str, Any]:
        """sft_data / rollouts: the stage, then how often the sampled answers are right."""
        from megatron_lopd.artifacts import RolloutArtifact

        result = self.run_pipeline_stage(name)
        art = RolloutArtifact.open(self.paths.pipeline / name, verify=False)
        answers = {p.id: p.answer for p in task.make_splits(self._split_sizes())["sft" if name == "sft_data" else "opd"]}
        correct = sum(task.extract_answer(r.text) == answers[r.prompt_id] and r.finish_reason == "stop" for r in art)
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in art)
        return {**result, "samples": len(art), "correct_fraction": correct / len(art), "forward_tokens": tokens,
                "backend": art.manifest.producer.get("backend")}

    def _split_sizes(self) -> dict[str, int]:
        s = self.sizes
        return {"eval": s.eval_problems, "teacher": s.teacher_problems, "sft": s.sft_prompts, "opd": s.opd_prompts}

    def stage_sft(self) -> dict[str, Any]:
        result = self.run_pipeline_stage("sft")
        return {**result, "measure": self.measure("sft_R", self.paths.pipeline / "sft" / "hf")}

    def offline_overrides(self, name: str, loss: str, store: Path, run_dir: Path, pipe: Path | None = None) -> list[str]:
        """An offline run from R (of the pipeline in `pipe`, default the demo's) on `store`."""
        s, pipe = self.sizes, pipe or self.paths.pipeline
        return [
            f"model.start_from={pipe / 'sft' / 'hf'}", f"data.store={store}", f"data.sft_data={pipe / 'sft_data'}",
            f"run_dir={run_dir}", f"loss={loss}", f"train_steps={s.opd_steps}", f"optimizer.lr={s.opd_lr}",
            "checkpoint.export_hf=true", *self.train_overrides(name),
        ]

    def stage_lightning_topk(self) -> dict[str, Any]:
        run_dir = self.paths.variant("lightning_topk")
        t0 = time.perf_counter()
        self.run_training(self.offline_overrides("lightning_topk", "topk_reverse_kl", self.paths.pipeline / "teacher_store", run_dir))
        return self.finish_variant("lightning_topk", run_dir, run_dir / "hf", time.perf_counter() - t0, {
            "loss": "topk_reverse_kl", "data": "teacher A store",
            "teacher_forward_tokens": self.state["stages"]["score"]["teacher_forward_tokens"]})

    def stage_score_teacher_b(self) -> dict[str, Any]:
        from megatron_lopd.generation.score import ScoreConfig, score_to_store

        s = self.sizes
        result = score_to_store(ScoreConfig(
            rollouts=self.paths.pipeline / "rollouts", teacher=self.paths.teacher("B"), out=self.paths.store_b,
            top_k=s.top_k, backend="hf", dtype="float32", overwrite=True, progress=self.progress,
        ))
        summary = result.summary
        return {"teacher_forward_tokens": summary.prompt_tokens + summary.response_tokens, "bytes_per_token": summary.bytes_per_token,
                "store_bytes": summary.nbytes}

    def stage_offline_teacher_b(self, name: str, loss: str) -> dict[str, Any]:
        run_dir = self.paths.variant(name)
        t0 = time.perf_counter()
        # The research opt-out: the store's teacher (B) did not write the SFT data (A did).
        self.run_training(self.offline_overrides(name, loss, self.paths.store_b, run_dir) + ["teacher_consistency.allow_inconsistent_teacher=true"])
        return self.finish_variant(name, run_dir, run_dir / "hf", time.perf_counter() - t0, {
            "loss": loss, "data": "teacher B store (consistency opt-out)",
            "teacher_forward_tokens": self.state["stages"]["score_teacher_b"]["teacher_forward_tokens"]})

    def stage_residualize_teacher_b(self) -> dict[str, Any]:
        """The consistency meter on both stores, then teacher B's store corrected for style (default StyleConfig)."""
        from megatron_lopd.generation.prompts import load_tokenizer
        from megatron_lopd.store.style import consistency_report, residualize_store

        tokenizer = load_tokenizer(self.paths.tokenizer)
        meter_a = consistency_report(self.paths.pipeline / "teacher_store", tokenizer=tokenizer, top=5)
        result = residualize_store(self.paths.store_b, self.paths.store_b_residualized, overwrite=True, tokenizer=tokenizer)
        brief = lambda r: {k: v for k, v in r.to_dict().items() if k in ("gap", "residual", "explained", "recurring", "config")}  # noqa: E731
        return {"meter": {"teacher_a": brief(meter_a), "teacher_b": brief(result.report)},
                "positive_scores": result.positive_scores, "topk_kl": result.topk_kl, "topk_top1_changed": result.topk_top1_changed}

    def stage_offline_teacher_b_residualized(self, name: str, loss: str) -> dict[str, Any]:
        run_dir = self.paths.variant(name)
        t0 = time.perf_counter()
        self.run_training(self.offline_overrides(name, loss, self.paths.store_b_residualized, run_dir))  # accepted: no opt-out
        return self.finish_variant(name, run_dir, run_dir / "hf", time.perf_counter() - t0, {
            "loss": loss, "data": "teacher B store, style-residualized",
            "teacher_forward_tokens": self.state["stages"]["score_teacher_b"]["teacher_forward_tokens"]})

    def stage_online(self, name: str, loss: str) -> dict[str, Any]:
        from megatron_lopd.demo.online import OnlineConfig

        s, p = self.sizes, self.paths
        run_dir = p.variant(name)
        online = OnlineConfig(
            teacher=str(p.teacher("A")), prompts=str(p.prompts("opd")), temperature=s.temperature, max_tokens=s.max_tokens,
            # The same engine settings as the pipeline's rollouts stage (`lopd generate --backend hf`): a fair wall-clock comparison.
            top_k=s.top_k, seed=self.seed_of("online/" + name), backend="hf",
        )
        overrides = [
            f"model.start_from={p.pipeline / 'sft' / 'hf'}", f"data.store=online:{p.teacher('A')}", f"run_dir={run_dir}",
            f"loss={loss}", f"train_steps={s.opd_steps}", f"optimizer.lr={s.opd_lr}", "checkpoint.export_hf=true",
            *self.train_overrides(name),
        ]
        t0 = time.perf_counter()
        _summary, stats = self.run_training(overrides, online=online)
        return self.finish_variant(name, run_dir, run_dir / "hf", time.perf_counter() - t0, {
            "loss": loss, "data": "fresh student samples, teacher A live", "teacher_forward_tokens": stats.teacher_forward_tokens,
            "online_stats": dataclasses.asdict(stats)})

    def stage_continued_sft(self) -> dict[str, Any]:
        s, pipe = self.sizes, self.paths.pipeline
        run_dir = self.paths.variant("continued_sft")
        t0 = time.perf_counter()
        self.run_training([
            f"model.start_from={pipe / 'sft' / 'hf'}", f"data.sft_data={pipe / 'sft_data'}", f"run_dir={run_dir}", "loss=sft",
            f"train_steps={s.opd_steps}", f"optimizer.lr={s.continued_sft_lr}", "schedule.kind=constant", "schedule.warmup_fraction=0",
            f"checkpoint.save_every={s.curve_every}", "checkpoint.keep_last=0", "checkpoint.export_hf=true", *self.train_overrides("continued_sft"),
        ], config="sft")
        return self.finish_variant("continued_sft", run_dir, run_dir / "hf", time.perf_counter() - t0, {
            "loss": "sft", "data": "teacher A's SFT data", "teacher_forward_tokens": 0})

    def stage_report(self) -> None:
        from megatron_lopd.demo.report import write_report

        write_report(self.paths.out, build_summary(self))

    # ------------------------------------------------------------------ the plan
    def stages(self) -> list[Stage]:
        """Every stage with what it needs first, in priority order (a topological order: run
        one after the other, it is the sequential plan). The long chain to R and the store comes
        first, then the long online runs, so that parallel lanes finish together."""
        p, s = self.paths, self.sizes
        out = [
            Stage("task", "tokenizer, problems, reference solutions, random models", self.stage_task, (p.tokenizer, p.data, p.work / "models")),
            Stage("teacher_a", "train teacher A on style-A solutions (SFT trainer)", lambda: self.stage_teacher("A"), (p.teacher_run("A"),), ("task",)),
            Stage("teacher_b", "train teacher B on style-B solutions (SFT trainer)", lambda: self.stage_teacher("B"), (p.teacher_run("B"),), ("task",)),
            Stage("base_student", "measure the base student", self.stage_base, (), ("task",)),
            Stage("sft_data", "pipeline: teacher A writes the SFT data", lambda: self.stage_artifact_info("sft_data"), (), ("teacher_a",)),
            Stage("sft", "pipeline: SFT of the base student -> R", self.stage_sft, (), ("sft_data",)),
            Stage("rollouts", "pipeline: R samples the OPD rollouts", lambda: self.stage_artifact_info("rollouts"), (), ("sft",)),
            Stage("score", "pipeline: teacher A scores the rollouts into the store", self.stage_score_info, (), ("rollouts",)),
        ]
        for loss in s.online_losses:
            name = comparison_name("online", loss)
            out.append(Stage(name, f"standard online OPD, teacher A live ({LOSS_LABELS[loss]})",
                             lambda n=name, l=loss: self.stage_online(n, l), (p.variant(name),), ("sft",)))
        out += [
            Stage("train", "pipeline: Lightning OPD from R (paper loss)", lambda: self.run_pipeline_stage("train"), (), ("score",)),
            Stage("export", "pipeline: export the student to Hugging Face", lambda: self.run_pipeline_stage("export"), (), ("train",)),
            Stage("eval", "pipeline: evaluate the student", self.stage_lightning_eval, (), ("export",)),
            Stage("lightning_topk", "Lightning OPD from R, top-k reverse KL", self.stage_lightning_topk, (p.variant("lightning_topk"),), ("score",)),
            Stage("score_teacher_b", "teacher B scores the same rollouts", self.stage_score_teacher_b, (p.store_b,), ("rollouts", "teacher_b")),
        ]
        for loss in s.comparison_losses:
            name = comparison_name("offline_teacher_b", loss)
            out.append(Stage(name, f"offline OPD on teacher B's store ({LOSS_LABELS[loss]})",
                             lambda n=name, l=loss: self.stage_offline_teacher_b(n, l), (p.variant(name),), ("score_teacher_b",)))
        out.append(Stage("residualize_teacher_b", "consistency meter on both stores; teacher B's store style-residualized",
                         self.stage_residualize_teacher_b, (p.store_b_residualized,), ("score", "score_teacher_b")))
        for loss in s.comparison_losses:
            name = comparison_name("offline_teacher_b_residualized", loss)
            out.append(Stage(name, f"offline OPD on teacher B's style-residualized store ({LOSS_LABELS[loss]})",
                             lambda n=name, l=loss: self.stage_offline_teacher_b_residualized(n, l), (p.variant(name),),
                             ("residualize_teacher_b",)))
        out.append(Stage("continued_sft", "continued SFT from R (reference)", self.stage_continued_sft, (p.variant("continued_sft"),), ("sft",)))
        return out

    def lane_runner(self) -> Callable[[], "Demo"]:
        """What a lane builds: this demo, with the worker's console (its stage log) and no bars."""
        return functools.partial(Demo, self.paths.out, self.seed, self.sizes, {}, print, False, shared_teachers=self.shared_teachers)

    @property
    def log_dir(self) -> Path:
        return self.paths.logs / "demo"

    def close(self) -> None:
        if self._measurer is not None:
            self._measurer.close()

    def run(self) -> dict[str, Any]:
        """Every stage not finished before (in `jobs` parallel lanes), then the report (always rewritten)."""
        self.state["invocation_seconds"] = run_plan(self, self.stages())
        self.state["elapsed_seconds"] = self.state.get("elapsed_seconds", 0.0) + self.state["invocation_seconds"]
        self.save_state()
        self.stage_report()
        return json.loads((self.paths.out / SUMMARY_NAME).read_text())


# ---------------------------------------------------------------------------------------
# Summary


def build_summary(demo: Demo) -> dict[str, Any]:
    """Everything the report says, as numbers (summary.json)."""
    from megatron_lopd.runtime.versions import versions

    st = demo.state["stages"]
    names = [n for n in variant_names(demo.sizes) if n in st or n == "lightning" and "eval" in st]

    def variant(n: str) -> dict[str, Any]:
        return st["eval"] if n == "lightning" else st[n]

    def acc(m: dict[str, Any]) -> dict[str, Any]:
        return {k: m[k] for k in ("pass1", "pass1_stderr", "sampled_pass1", "kl_to_teacher_a", "response_tokens")}

    stage_seconds = {n: round(r["seconds"], 2) for n, r in st.items()}
    stage_cpu = {n: round(r.get("cpu_seconds", 0.0), 2) for n, r in st.items()}
    accuracy = {"base_student": acc(st["base_student"]["measure"]), "teacher_a": acc(st["teacher_a"]["measure"]),
                "teacher_b": acc(st["teacher_b"]["measure"]), "sft_R": acc(st["sft"]["measure"])}
    correct = {"sft_R": st["sft"]["measure"]["correct"]}
    variants = {}
    for n in names:
        v = variant(n)
        accuracy[n] = acc(v["measure"])
        correct[n] = v["measure"]["correct"]
        variants[n] = {
            "label": variant_label(n), "base": variant_base(n), "loss": v["loss"], "data": v["data"], "train_seconds": round(v["train_seconds"], 2),
            "teacher_forward_tokens": v["teacher_forward_tokens"], "curve": v["curve"], "metrics": v["metrics"],
            **({"online_stats": v["online_stats"]} if "online_stats" in v else {}),
        }
    offline_cost = sum(st[n]["seconds"] for n in ("rollouts", "score") if n in st)
    return {
        "seed": demo.seed,
        "sizes": demo.sizes.to_dict(),
        "versions": versions(),
        "accuracy": accuracy,
        "paired_correct": correct,
        "variants": variants,
        "cpu_s": {"stages": stage_cpu, "total": round(sum(stage_cpu.values()), 2)},
        # total: from the first stage's start to the last one's end (summed over resumed invocations);
        # stage_sum counts each stage's own time, lanes in parallel added up.
        "wall_clock_s": {"stages": stage_seconds, "total": round(demo.state.get("elapsed_seconds", 0.0), 2),
                         "stage_sum": round(sum(stage_seconds.values()), 2), "jobs": demo.jobs,
                         "this_invocation": round(demo.state.get("invocation_seconds", 0.0), 2),
                         "offline_rollouts_plus_scoring": round(offline_cost, 2)},
        "teacher_forward_tokens": {
            "sft_data_generation": st["sft_data"]["forward_tokens"],
            "offline_scoring_teacher_a": st["score"]["teacher_forward_tokens"],
            "offline_scoring_teacher_b": st.get("score_teacher_b", {}).get("teacher_forward_tokens"),
            **{f"online:{n}": variants[n]["teacher_forward_tokens"] for n in names if n.startswith("online")},
        },
        **({"consistency": {k: st["residualize_teacher_b"][k] for k in ("meter", "positive_scores", "topk_kl", "topk_top1_changed")}}
           if "residualize_teacher_b" in st else {}),
        "store": {"bytes_per_token": st["score"]["bytes_per_token"], "bytes": st["score"]["store_bytes"],
                  "response_tokens": st["score"]["response_tokens"], "top_k": st["score"]["top_k"]},
        "data": {"sft_data_correct": st["sft_data"]["correct_fraction"], "sft_data_backend": st["sft_data"]["backend"],
                 "rollouts_correct": st["rollouts"]["correct_fraction"], "rollouts": st["rollouts"]["samples"],
                 "sft_samples": st["sft_data"]["samples"]},
        "example": st["task"]["example"],
        **({"teachers_shared_from": st["teacher_a"]["shared_from"]} if "shared_from" in st.get("teacher_a", {}) else {}),
    }


# ---------------------------------------------------------------------------------------
# Entry


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    sizes: DemoSizes = DemoSizes(),
    console: Callable[[str], None] | None = None,
    progress: bool = True,
    jobs: int | None = None,
    shared_teachers: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the demo into `out` in `jobs` parallel lanes (default: one per usable
    CPU, at most 4); returns summary.json's content. `shared_teachers`: a finished demo with the
    same sizes whose teachers are reused (linked) instead of trained again."""
    out = Path(out)
    echo = console or (lambda line: print(line, flush=True))
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs}: needs at least one lane", "pass --jobs 1 or more (default: one per usable CPU, at most 4)")
    state = prepare_out_dir(out, seed=seed, sizes=sizes, overwrite=overwrite, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    prepare_process()
    demo = Demo(out, seed, sizes, state, echo, progress, jobs=jobs or default_jobs(), shared_teachers=shared_teachers)
    demo.save_state()
    summary = demo.run()
    from megatron_lopd.demo.report import console_summary

    echo(console_summary(summary, out))
    return summary


def run_demo_seeds(out: str | Path, seeds: list[int], *, overwrite: bool = False, resume: bool = False, sizes: DemoSizes = DemoSizes(),
                   console: Callable[[str], None] | None = None, progress: bool = True, jobs: int | None = None) -> dict[str, Any]:
    """The demo once per seed into `out/seed-N/` (each resumable on its own; the teachers, which
    do not depend on the seed, are trained by the first seed and linked into the others), then
    the numbers over seeds (`demo.aggregate`) into `out/`; returns aggregate.json's content."""
    from megatron_lopd.demo.aggregate import console_aggregate, write_aggregate

    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds", "e.g. --seeds 0,1,2")
    out = Path(out)
    echo = console or (lambda line: print(line, flush=True))
    dirs = {seed: out / f"seed-{seed}" for seed in seeds}
    for seed, d in dirs.items():  # every seed's directory is checked before the first seed's work
        if d.exists() and not overwrite:
            prepare_out_dir(d, seed=seed, sizes=sizes, overwrite=False, resume=resume)
    summaries = []
    for i, (seed, d) in enumerate(dirs.items()):
        echo(f"== demo seed {seed} -> {d}")
        summaries.append(run_demo(d, seed=seed, overwrite=overwrite, resume=resume and d.exists(), sizes=sizes, console=console,
                                  progress=progress, jobs=jobs, shared_teachers=dirs[seeds[0]] if i else None))
    agg = write_aggregate(out, summaries)
    echo(console_aggregate(agg, out))
    return agg
