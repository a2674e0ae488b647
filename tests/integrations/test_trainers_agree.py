"""The same model and data give the same per-step numbers in a plain loop, under Lightning and under
the Hugging Face Trainer."""

import lightning.pytorch as L
import pytest
import torch
from torch import nn

import gradscope
from gradscope.integrations.lightning import GradscopeCallback as LightningCallback
from gradscope.integrations.transformers import GradscopeCallback as HFCallback
from tests.integrations.test_lightning import trainer_for
from tests.integrations.test_transformers import trainer
from tests.trainer_setup import fresh_accelerate  # noqa: F401 (a fixture)

STEPS, BATCH = 4, 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.fc2(torch.tanh(self.fc1(x)))
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(STEPS * BATCH, 4, generator=gen), torch.randn(STEPS * BATCH, 1, generator=gen)


def plain_loop() -> gradscope.Report:
    (x, y), model = data(), Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt) as scope:
        for i in range(STEPS):
            opt.zero_grad()
            loss = model(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH])["loss"]
            loss.backward()
            scope.step(loss)
            opt.step()
    return scope.report


def lightning() -> gradscope.Report:
    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch, index):
            return self.net(*batch)["loss"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = LightningCallback()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=BATCH)
    trainer_for(callback).fit(Module(), loader)
    return callback.report


def hf_trainer(tmp_path) -> gradscope.Report:
    x, y = data()
    callback = HFCallback()
    rows = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    overrides = dict(per_device_train_batch_size=BATCH, max_steps=STEPS, lr_scheduler_type="constant", max_grad_norm=0)
    trainer(tmp_path, Net(), callback, dataset=rows, **overrides).train()
    return callback.report


@pytest.mark.usefixtures("fresh_accelerate")
def test_plain_loop_lightning_and_hf_trainer_record_the_same_steps(tmp_path):
    reports = [plain_loop(), lightning(), hf_trainer(tmp_path)]
    norms = [[s.grad_norm_total for s in r.steps] for r in reports]
    losses = [[s.loss for s in r.steps] for r in reports]
    assert len(norms[0]) == STEPS
    for other in norms[1:]:
        assert other == pytest.approx(norms[0], rel=1e-6)
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-6)
    per_parameter = [[s.parameters["fc1.weight"].grad_norm for s in r.steps] for r in (reports[0], reports[2])]
    assert per_parameter[1] == pytest.approx(per_parameter[0], rel=1e-6)
