"""train: a TRL trainer (train.method: sft | dpo | kto | grpo) on pack's rows, full weights or
LoRA/QLoRA, under `accelerate launch` (single process, DDP, FSDP or DeepSpeed ZeRO).

Shaped like a recipe:
    stage.py        the job side, once per job: check the machine, start the processes, wait
    launcher.py     the `accelerate launch` command of a launcher config, stop-signal forwarding
    worker.py       one training process: setup / train / finish (`python -m ftflow.train`)
    trainers.py     the TRL trainer of each method, fed pack's rows as they are
    callbacks.py    the loss curve, checkpoint completion, stop on a signal
    curve.py        the curve's table, results/train/loss.csv (training and validation rows)
    workers.py      each process's record (host, pid, how it ended) for the job side
    checkpoints.py  where a run's checkpoints live, which one resumes, what is removed
    probe.py        the trained model's logits on a fixed prompt (consolidate checks them)
    rewards.py      GRPO's reward functions
    tracking.py     W&B / MLflow / TensorBoard
"""
