"""Training runs for the tests, made the way `python main.py` makes them: main.prepare, then train.train."""
import main
import train
from data import DataConfig
from mamba_config import MambaConfig
from train import TrainConfig


def train_run(model_cfg, data_cfg, train_cfg, resume=False) -> dict:
    """Train MambaLM(model_cfg) on data_cfg as train_cfg says; the last evaluation's metrics."""
    return train.train(main.prepare(model_cfg, data_cfg, train_cfg, resume), resume)


def train_task(folder, name, steps, seed=0) -> dict:
    """A small Mamba trained on a small Selective Copying (2 data tokens among 12 noise tokens, 3 data ids)
    into folder/name; the last evaluation's metrics."""
    data = DataConfig(task="selective_copying", task_vocab=5, task_tokens=2)
    model = MambaConfig(d_model=32, n_layer=2, d_state=16)
    cfg = TrainConfig(out_dir=str(folder / name), device="cpu", seed=seed, batch_size=32, seq_len=16,
                      max_steps=steps, lr=1e-2, min_lr=1e-3, warmup_steps=min(50, steps), eval_interval=steps,
                      eval_batches=8, log_interval=50, ckpt_interval=steps)
    return train_run(model, data, cfg)
