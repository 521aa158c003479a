"""The training loop, evaluation and the command line: both stages of SFTKey in one loop.

`python train.py` runs the default experiment offline on the embedded synthetic task: stage 1
(sft_tag), evaluation, stage 2 (sftkey_tag: key only, from stage 1's weights), evaluation, a table,
`results.json`. One loop, `train`, serves every stage; per-role loss weights are all that differ.
Plumbing (device, DDP, signals, MFU, flag checks, checkpoint files) is in runtime.py and checkpoints.py.
"""
from __future__ import annotations

if __name__ == "__main__":
    import startup  # noqa: F401  (first, before torch loads: a stop signal now ends in one line)

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

import checkpoints as ckpts
import data as D  # not "data": TrainConfig has a field of that name
import runtime
import sftkey
from model import GPT
from runtime import Dist, Meter, StopSignal, autocast


def _flag(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O and data
    out_dir: str = _flag("out", "folder for checkpoints, logs and results.json")
    data: str = _flag("", "training JSONL file; empty = the embedded synthetic task (--task)")
    format: str = _flag("gsm8k", f"layout of --data and --eval_data: {', '.join(D.FORMATS)}")
    eval_data: str = _flag("", "test JSONL file (same format as --data); without it --data runs are not evaluated")
    strip_calculator: bool = _flag(False, "delete each <<...>> (GSM8K's calculator notes) from the reasoning")
    skip_bad_lines: bool = _flag(False, "skip and count malformed lines of --data/--eval_data, not stop at one")
    untagged: bool = _flag(False, "responses as 'reasoning\\n#### answer', not tagged (plain SFT; Fmt undefined)")
    encoding: str = _flag(D.SYNTHETIC_ENCODING, "tokenizer: sftkey-chars (offline), a tiktoken name, a .tiktoken file")
    task: str = _flag("arithmetic", "synthetic task: arithmetic (answer: the result) or parity (even/odd: unwritten)")
    n_train: int = _flag(20000, "synthetic task: number of training problems")
    n_val: int = _flag(500, "validation examples carved from the training data (seeded; at most a tenth of it)")
    n_test: int = _flag(500, "synthetic task: number of test problems")
    data_seed: int = _flag(0, "synthetic task: seed of its problems, apart from --seed (all seeds share the test)")
    # the method
    init_from: str = _flag("", "checkpoint to start from (e.g. out/sft_tag/ckpt.pt, or GPT-2's from `python gpt2.py "
                               "import`, with the shape flags it prints); empty = random weights")
    weights: str = _flag("", "loss weights P,T,K of prompt, thinking and answer tokens in stage 1 (default 0,1,1); the "
                             "loss is sum(weight x token loss) / sum(weight), so only their ratios matter")
    key_only: bool = _flag(False, "short for --weights 0,0,1: the loss on the answer only (Key-Tag from scratch)")
    key_weight: float = _flag(1.0, "short for --weights 0,1,K: K > 1 gives each answer token K times a thinking "
                                   "token's share of the loss (the single-stage up-weighting control)")
    max_iters: int = _flag(1500, "optimizer steps of the (first) stage")
    stage2_iters: int = _flag(300, "then this many steps from the result (0 = a single stage)")
    stage2_weights: str = _flag("0,0,1", "loss weights P,T,K of stage 2: 0,0,1 is the method (the answer only), "
                                         "0,1,1 the compute-matched control, 0,0.1,1 a tenth on the thinking")
    stage2_lr: float = _flag(0.0, "peak learning rate of stage 2 (0 = lr x min_lr_ratio, where stage 1 ended)")
    stage2_dft: bool = _flag(False, "stage 2's token losses times the model's probability of each, held constant (DFT)")
    # model
    block_size: int = _flag(96, "longest sequence in tokens; longer examples are dropped and counted")
    n_layer: int = _flag(4, "transformer blocks")
    n_head: int = _flag(4, "attention heads")
    n_embd: int = _flag(128, "width of the residual stream")
    dropout: float = _flag(0.0, "dropout probability")
    # optimisation
    batch_size: int = _flag(32, "sequences per micro-batch")
    grad_accum: int = _flag(1, "micro-batches per optimizer step")
    lr: float = _flag(2e-3, "peak learning rate")
    warmup_iters: int = _flag(100, "linear warm-up steps (capped at a tenth of the stage), then cosine decay")
    min_lr_ratio: float = _flag(0.1, "the cosine decays to lr x this")
    weight_decay: float = _flag(0.1, "AdamW weight decay (matrices and embeddings only)")
    grad_clip: float = _flag(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = _flag(1337, "seed of the initial weights, the data order and the validation split (not the problems)")
    # evaluation and logging
    resume: bool = _flag(False, "continue from the checkpoints in --out_dir (same flags as the interrupted run)")
    overwrite: bool = _flag(False, "first delete an earlier run's checkpoints and results.json in --out_dir")
    ckpt_interval: int = _flag(0, "write a checkpoint every N steps (0 = every 5 minutes), and at each stage's end")
    eval_only: bool = _flag(False, "only evaluate --init_from on the test set (writes --out_dir/results.json)")
    eval_limit: int = _flag(0, "evaluate on the first N test examples only (0 = all)")
    eval_interval: int = _flag(250, "steps between validation losses (and --val_acc_n answers)")
    val_acc_n: int = _flag(100, "greedy Acc and Fmt on this many validation prompts at every --eval_interval (0 = off)")
    eval_batch_size: int = _flag(64, "prompts generated together at evaluation (in bfloat16 a few answers may change)")
    log_interval: int = _flag(50, "steps between log lines")
    show_roles: int = _flag(0, "first print this many training examples token by token with their roles (show.py)")
    # hardware
    device: str = _flag("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dtype: str = _flag("auto", "auto (bfloat16 autocast on CUDA from Ampere on, and on CPUs with AVX-512 BF16 when "
                               "--n_embd >= 256, where it is faster), float32, bfloat16")
    compile: bool = _flag(False, "torch.compile the model for training (one shape-generic graph); CPU: no gain")


# --- The loop -------------------------------------------------------------------------------

def stage2_peak_lr(cfg: TrainConfig) -> float:
    return cfg.stage2_lr or cfg.lr * cfg.min_lr_ratio


def lr_at(step: int, iters: int, peak: float, cfg: TrainConfig) -> float:
    """Linear rise to the peak at step min(--warmup_iters, iters // 10), cosine to peak x min_lr_ratio at the end."""
    warmup = min(cfg.warmup_iters, iters // 10)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)  # below the peak: it is reached once, at step `warmup`
    progress = (step - warmup) / max(1, iters - 1 - warmup)  # 1 at the last step: exactly the floor
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: GPT, train_set: D.TokenizedSet, val_set: D.TokenizedSet, cfg: TrainConfig, stage: sftkey.Stage,
          device: str, dtype: torch.dtype, log: list[dict], steps_before: int = 0,
          ckpt: ckpts.StageCheckpoint | None = None, dist: Dist = Dist(),
          peak_flops: float | None = None) -> torch.optim.Optimizer:
    """Train one `stage`: its steps, peak lr and loss (sftkey.Stage). A step's loss is sum(weight x token loss) /
    sum(weight) over its micro-batches and ranks. `steps_before`: steps earlier stages took on this data (the stream
    reads on); `ckpt` resumes and checkpoints the stage; `dist`: a torchrun job; `peak_flops`: for MFU."""
    optimizer = model.configure_optimizer(stage.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])  # per stage
    first_step = ckpt.restore(optimizer) if ckpt else 0
    net = dist.wrap(runtime.compiled(model, cfg.compile), device)
    # A step's examples, drawn together and cut into grad_accum x ranks micro-batches: the same ones however cut.
    batches = D.Batches(train_set, cfg.batch_size * cfg.grad_accum * dist.world, cfg.seed)
    meter = Meter(model, cfg, dist, device, stage.iters, first_step, peak_flops)
    for step in range(first_step, stage.iters):
        lr = lr_at(step, stage.iters, stage.lr, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [batches.get(steps_before + step, device, parts=cfg.grad_accum * dist.world,
                             part=dist.rank * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
        micro_weights = [sftkey.token_weights(roles, stage.weights) for _, _, roles in micro]  # the method's one line
        # Divide by the whole step's weight (all micro-batches, all ranks); x world undoes DDP's mean over ranks.
        total_weight = dist.all_reduce(sum(w.sum() for w in micro_weights))
        scale = dist.world / total_weight.clamp(min=1e-8)  # an all-zero step gives zero loss, not NaN
        step_loss = torch.zeros((), device=device)
        model.train()
        for i, ((x, y, roles), w) in enumerate(zip(micro, micro_weights)):
            with dist.no_sync(net, last_micro_batch=i == cfg.grad_accum - 1):
                with autocast(device, dtype):
                    loss = sftkey.weighted_loss_sum(net(x), model.lm_head, y, w, stage.dft) * scale
                loss.backward()
            step_loss += loss.detach()
            meter.count(roles, w)
        # The norm (--grad_clip 0: measured, unclipped) is the same on every rank; a bad one stops before the update.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):
            raise FloatingPointError(runtime.non_finite_message(stage, step, ckpt and ckpt.path))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if step % cfg.log_interval == 0 or step + 1 == stage.iters:
            log.append(meter.line(stage, step, lr, step_loss))
        if step % cfg.eval_interval == 0 or step + 1 == stage.iters:  # every rank: a share of the batches each
            with meter.paused():
                val = validation_loss(model, val_set, cfg, device, dtype, dist)
                if cfg.val_acc_n and val_set.enc:  # drift as it happens: answers, not only losses
                    found = evaluate(model, val_set.enc, val_set.examples[:cfg.val_acc_n], cfg, device, dtype, dist)
                    val.update(acc=found["acc"], fmt=found["fmt"])
            log.append(meter.validation_line(stage.name, step, val))
        if ckpt:
            ckpt.after_step(step + 1, stage.iters, model, optimizer)
    return optimizer


@torch.no_grad()
def validation_loss(model: GPT, val_set: D.TokenizedSet, cfg: TrainConfig, device: str,
                    dtype: torch.dtype, dist: Dist = Dist()) -> dict[str, float]:
    """Mean next-token loss on thinking tokens and on key tokens of the validation set (any stage); in a torchrun
    job each rank takes every world-th batch, and the sums are added up."""
    model.eval()
    sums, counts = torch.zeros(2, 3, device=device)
    for start in range(dist.rank * cfg.batch_size, len(val_set.ids), dist.world * cfg.batch_size):
        x, y, roles = D.collate(val_set.ids[start:start + cfg.batch_size],
                                val_set.roles[start:start + cfg.batch_size], device)
        with autocast(device, dtype):
            hidden = model(x)
            for role in (sftkey.THINK, sftkey.KEY):
                w = (roles == role).float()  # weight 1 on this role's targets, 0 elsewhere (PAD included)
                sums[role] += sftkey.weighted_loss_sum(hidden, model.lm_head, y, w)
                counts[role] += w.sum()
    sums, counts = dist.all_reduce(torch.stack([sums, counts]))
    mean = (sums / counts.clamp(min=1)).tolist()
    return {"thinking": mean[sftkey.THINK], "key": mean[sftkey.KEY]}


# --- Evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: GPT, enc, examples: list[D.Example], cfg: TrainConfig, device: str,
             dtype: torch.dtype, dist: Dist = Dist()) -> dict:
    """Greedy answers to the test prompts (all kept, in their order); Acc, Fmt (tagged only) and the composite.
    In a torchrun job the ranks take turns at the batches one process would run (the same answers), then share."""
    model.eval()
    tagged = not cfg.untagged
    prompts = [enc.encode_ordinary(sftkey.prompt_head(ex.prompt)) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    answers = {}  # prompt index: (correct, formatted, response), for this rank's batches
    allowed = D.generable_ids(enc, model.config.vocab_size).to(device)
    for start in range(dist.rank * cfg.eval_batch_size, len(order), dist.world * cfg.eval_batch_size):
        rows = order[start:start + cfg.eval_batch_size]
        with autocast(device, dtype):
            outs = model.generate([prompts[i] for i in rows], cfg.block_size, enc.eot_token, allowed=allowed)
        for i, out in zip(rows, outs):
            ended = bool(out) and out[-1] == enc.eot_token
            response = enc.decode(out[:-1] if ended else out)
            answers[i] = (sftkey.answers_match(sftkey.extract_answer(response, tagged), examples[i].answer),
                          sftkey.format_ok(response, ended),
                          {"prompt": examples[i].prompt, "response": response, "reference": examples[i].answer})
    answers = {i: answer for share in dist.gather(answers) for i, answer in share.items()}  # every rank's
    correct, formatted, responses = ([answers[i][k] for i in range(len(examples))] for k in range(3))
    acc = float(np.mean(correct)) if examples else None  # no test set (--data without --eval_data)
    fmt = float(np.mean(formatted)) if tagged and examples else None
    return {"acc": acc, "fmt": fmt, "composite": sftkey.composite(acc, fmt) if fmt is not None else None,
            "n": len(examples), "correct": correct, "formatted": formatted if tagged else None, "responses": responses}


# --- The two stages, and the command line ---------------------------------------------------

def plan_stages(cfg: TrainConfig, before: str = "") -> list[sftkey.Stage]:
    """Stage 1 (--weights) if --max_iters > 0, then stage 2 (--stage2_weights, --stage2_dft) if --stage2_iters > 0.
    `before` is the stage an --init_from checkpoint ended, so that names tell each stage's history."""
    weights, weights2 = runtime.loss_weights(cfg)
    stages = [sftkey.Stage(sftkey.stage_name(before, weights, not cfg.untagged), weights, cfg.max_iters, cfg.lr)]
    stages = stages if cfg.max_iters > 0 else []  # a stage of no steps would take a name for nothing trained
    if cfg.stage2_iters > 0:
        name = sftkey.stage_name(stages[0].name if stages else before, weights2, not cfg.untagged, cfg.stage2_dft)
        stages.append(sftkey.Stage(name, weights2, cfg.stage2_iters, stage2_peak_lr(cfg), cfg.stage2_dft))
    return stages


def run(cfg: TrainConfig) -> dict:
    """The stages of plan_stages, each trained, checkpointed and evaluated (or --eval_only --init_from). An evaluated
    stage's checkpoint (out_dir/STAGE/ckpt.pt) holds its results: --resume skips it, continues an unfinished one."""
    with StopSignal() as stop, ckpts.RunFolder(cfg.out_dir, cfg.overwrite, cfg.resume, flags=vars(cfg)) as folder:
        dist = Dist.from_environment(cfg)
        cfg, device, dtype = runtime.set_up_device(cfg, dist)  # cfg: --dtype auto as resolved here
        inputs = ckpts.read_inputs(cfg)  # every input file read once and hashed: later edits cannot matter
        enc = D.get_encoding(cfg.encoding, inputs.raw.get("encoding"))
        step_examples = 1 if cfg.eval_only else cfg.batch_size * cfg.grad_accum * dist.world
        model = ckpts.build_model(cfg, enc, device, inputs)  # before the data: a wrong-shaped --init_from is named
        train_set, val_set, test = D.load_data(cfg, enc, inputs.raw, step_examples)
        stages = [] if cfg.eval_only else plan_stages(cfg, inputs.origin[0])  # origin: (stage, step) of --init_from
        if dist.master:
            runtime.print_setup([train_set, val_set], test, model, device, dist, dtype, stages)
            if cfg.show_roles:  # the role viewer, imported only when asked for
                print(__import__("show").show_examples(train_set, enc, cfg.show_roles, {
                    s.name: s.weights for s in stages}, tagged=not cfg.untagged), flush=True)
        folder.take([(name,) for name in ckpts.TRAIN_FILES] + [(s.name, ckpts.CKPT_NAME) for s in stages],  # now lock
                    lambda path: ckpts.check_resume(path, cfg, model.config, dist.world, inputs.sha256), dist)
        results = {"init": evaluate(model, enc, test, cfg, device, dtype, dist)} if cfg.eval_only else {}
        seconds, log = {}, ckpts.LiveLog(cfg.out_dir if dist.master else None)  # out_dir/log.jsonl
        for k, stage in enumerate(stages):  # one model: each stage starts from the weights the last one left
            path = ckpts.owned_path(cfg.out_dir, stage.name, ckpts.CKPT_NAME)
            saved = ckpts.read_checkpoint(path, model.config, device) if cfg.resume and os.path.exists(path) else None
            if saved is not None:
                model.load_state_dict(saved["model"])
                log.resume(saved)  # its rows; rows a killed run wrote to log.jsonl after it go as the next one comes
                results, seconds = saved["results"], saved["seconds"]
                if stage.name in results:  # finished and evaluated before the interruption: the next one goes on
                    ckpts.restore_rng(saved, dist.rank)  # from the RNG state this one ended with
                    continue
            steps_before = inputs.origin[1] + sum(s.iters for s in stages[:k])  # the data stream reads on
            extra = {"results": results, "seconds": seconds, "stream_start": steps_before, "file_hashes": inputs.sha256}
            ckpt = ckpts.StageCheckpoint(path, cfg, stage.name, log, saved, extra, stop, dist)  # extra: in every write
            with stop.deferred():  # a signal here stops after the step in flight and its checkpoint
                optimizer = train(model, train_set, val_set, cfg, stage, device, dtype, log, steps_before, ckpt, dist,
                                  runtime.peak_flops(device, dtype))
                seconds[stage.name] = ckpt.elapsed()
                ckpt.save(stage.iters, model, optimizer)  # the stage's weights, before evaluating
            dist.print(f"{stage.name}: evaluating on {len(test)} test prompts (greedy) ...")
            results[stage.name] = evaluate(model, enc, test, cfg, device, dtype, dist)  # every rank, a share each
            log.note({"stage": stage.name, "results": {k: results[stage.name][k] for k in ("acc", "fmt", "n")}})
            ckpt.save(stage.iters, model, optimizer)  # now with its results: resume skips it
            if dist.master:
                runtime.print_result(stage.name, results[stage.name], seconds[stage.name])
        summary = {"config": dataclasses.asdict(cfg), "stages": [dataclasses.asdict(s) for s in stages], "log": log,
                   "data": [train_set.summary, val_set.summary], "results": results, "train_seconds": seconds,
                   "machine": {**runtime.machine(device, dtype), "ranks": dist.world}}  # what else moves the numbers
        if dist.master:
            print(runtime.results_table(results))
            ckpts.write_json(ckpts.owned_path(cfg.out_dir, ckpts.RESULTS_NAME), summary)
        dist.close()
        return summary


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    return runtime.flag_parser(TrainConfig, description)  # one flag per TrainConfig field, with its help


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**runtime.parse_flags(build_parser(), argv))


def main(argv: list[str] | None = None) -> None:
    # Errors and stops: one line each. RANK: torchrun's (Dist.from_environment started a process group).
    runtime.command(lambda: run(runtime.check_config(parse_args(argv))), torchrun_worker="RANK" in os.environ)


if __name__ == "__main__":
    main()
