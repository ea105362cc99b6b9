"""DessiLBI in the Hugging Face Trainer (the Lightning callback is tested by its tutorial)."""

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups, unwrap_optimizer
from dessilbi.integrations.common import find_dessilbi
from dessilbi.sparsity import Mask


class Classifier(nn.Module):
    """What the Trainer expects of a model: keyword inputs, a loss when labels are given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, inputs, labels=None):
        logits = self.net(inputs)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def dataset(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1))  # learnable
    return [{"inputs": x[i], "labels": y[i]} for i in range(n)]


def test_hf_trainer_logs_the_structure_and_saves_masks(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from dessilbi.integrations.hf import MASKS_FILE, DessiLBITrainerCallback

    torch.manual_seed(0)
    model = Classifier()
    opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=2.0)  # a path fast enough for 128 steps
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=4,
                             per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             eval_strategy="epoch", save_strategy="epoch", report_to=[],
                             use_cpu=True, logging_strategy="no", disable_tqdm=True)
    callback = DessiLBITrainerCallback()
    trainer = Trainer(model=model, args=args, train_dataset=dataset(1024, 0),
                      eval_dataset=dataset(256, 1), optimizers=(opt, None), callbacks=[callback])
    trainer.train()
    assert [round(e["epoch"]) for e in callback.history] == [1, 2, 3, 4]
    last = callback.history[-1]
    assert 0 < last["dessilbi/unit_density"] < 1 and last["dessilbi/sparse_acc"] > 0.8
    assert all("dessilbi/sparse_acc" in e for e in callback.history)
    assert last in trainer.state.log_history
    # the wrapper the Trainer holds is unwrapped by the helpers
    assert unwrap_optimizer(trainer.optimizer) is opt
    mask = Mask.from_optimizer(model, trainer.optimizer)
    saved = Mask.load(tmp_path / "checkpoint-128" / MASKS_FILE)
    assert saved == mask


def test_find_dessilbi_skips_other_optimizers():
    model = Classifier()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert find_dessilbi([sgd]) is None
    opt = DessiLBI(lbi_param_groups(model), lr=0.1)
    assert find_dessilbi([sgd, opt]) is opt


def test_timm_models_get_the_documented_groups():
    timm = pytest.importorskip("timm")
    from timm.layers import RmsNorm

    vit = timm.models.VisionTransformer(img_size=16, patch_size=8, in_chans=1, num_classes=3,
                                        embed_dim=16, depth=1, num_heads=2,
                                        norm_layer=RmsNorm, init_values=1e-5)
    groups = {g["name"]: g for g in lbi_param_groups(vit, weight_decay=0.05)}
    names = {id(p): n for n, p in vit.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    # tokens and position embeddings (no_weight_decay()), RmsNorm gains, layer scales
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.weight",
            "blocks.0.ls1.gamma", "blocks.0.ls2.gamma"} <= no_decay
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in groups["linear"]["params"]}
    opt = DessiLBI(lbi_param_groups(vit), lr=0.05, total_steps=10)
    x = torch.randn(4, 1, 16, 16)
    for _ in range(2):
        opt.zero_grad()
        vit(x).logsumexp(1).mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in vit.parameters())
