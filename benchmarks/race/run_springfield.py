"""springfield's row of the race: its real jitted steps on its own model."""

from __future__ import annotations

import numpy as np

from race.common import LR, Config, Runner


class SpringfieldRunner(Runner):
    """springfield's real steps on springfield's model, Adam via springfield's optimizer
    factory, batches through ``parallel.shard_batch`` as in the training loop."""

    def __init__(
        self,
        cfg: Config,
        images: np.ndarray,
        labels: np.ndarray,
        precision: str = "float32",
        proc: str = "springfield",
    ) -> None:
        import jax
        import optax

        from race.rows import springfield_kernels
        from springfield import kernels, parallel
        from springfield.models import MODELS, build_model, count_params
        from springfield.training.optim import make_optimizer
        from springfield.training.steps import init_state, make_eval_step, make_train_step

        choice, portable = springfield_kernels(proc)
        with kernels.portable() if portable else kernels.use():
            model = build_model(
                cfg.net, cfg.classes, image_size=cfg.size, precision=precision, kernels=choice
            )
        if MODELS[cfg.net].load_pretrained:  # the EfficientNet-Lites: ImageNet weights, new head
            MODELS[cfg.net].load_pretrained(model)
        self.params = count_params(model)
        schedule = optax.constant_schedule(LR)
        tx = make_optimizer("adam", schedule)
        graphdef, state = init_state(model, tx)
        self.mesh = parallel.make_mesh()
        self.state = parallel.replicate(state, self.mesh)
        # As the training loop does: Adam as one in-place pass where the kernel runs.
        update = kernels.optimizer_update(tx, choice, name="adam", schedule=schedule)
        self.step = make_train_step(graphdef, tx, update=update)
        self.eval_step = make_eval_step(graphdef)
        self.batch = {"image": images, "label": labels, "mask": np.ones(len(labels), np.float32)}
        self.key = jax.random.key(0)
        self.device = jax.devices()[0].device_kind
        self._jax = jax
        self._shard = parallel.shard_batch

    def train(self, n: int) -> None:
        state = self.state
        for _ in range(n):
            state, m = self.step(state, self._shard(self.batch, self.mesh), self.key)
        self._jax.block_until_ready((state, m))
        self.state = state

    def eval(self, n: int) -> None:
        for _ in range(n):
            logits, _ = self.eval_step(
                self.state.params, self.state.rest, self._shard(self.batch, self.mesh)
            )
        self._jax.block_until_ready(logits)
