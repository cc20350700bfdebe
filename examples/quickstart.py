# %% [markdown]
# # springfield quickstart
#
# Train a Simpsons classifier on springfield's built-in dataset (seeded cartoon portraits of
# Bart, Homer, Lisa and Marge, written once into the cache as real JPEGs), plot its curves and
# predict images with the trained model. Open this file in Jupyter, VS Code or Spyder as a
# notebook (each `# %%` starts a cell), or run it as a script: `python examples/quickstart.py`.

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

import springfield

# A few epochs take a minute or two on a 2-core CPU; the test suite sets these smaller.
EPOCHS = int(os.environ.get("QUICKSTART_EPOCHS", "4"))
PER_CLASS = int(os.environ.get("QUICKSTART_PER_CLASS", "250"))
WORKDIR = Path(os.environ.get("QUICKSTART_WORKDIR", "runs/quickstart"))

# %% [markdown]
# ## Train
#
# `springfield.train` takes the flags of `springfield train` as keyword arguments and returns
# a `Run`. Running the cell again resumes (or, once finished, just re-reads) the run folder.
# `workers=0` decodes in this process: grain's worker processes would re-import a script's
# top level (in a notebook you can leave it out for faster input).

# %%
run = springfield.train(
    epochs=EPOCHS,
    synthetic_per_class=PER_CLASS,
    workdir=WORKDIR,
    workers=0,
    tensorboard=False,
)
print(run)
print("final validation accuracy:", run.result["accuracy"])

# %% [markdown]
# ## Curves
#
# `run.metrics` holds one row per epoch, as in the run folder's `metrics.jsonl`.

# %%
epochs = [r["epoch"] for r in run.metrics]
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
for split in ("train", "val"):
    ax_loss.plot(epochs, [r[f"{split}_loss"] for r in run.metrics], marker="o", label=split)
    ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in run.metrics], marker="o", label=split)
ax_loss.set(title="loss", xlabel="epoch")
ax_acc.set(title="accuracy", xlabel="epoch")
ax_loss.legend()
fig.tight_layout()
fig.savefig(run.path / "quickstart_curves.png")
plt.show()

# %% [markdown]
# ## Predict
#
# `springfield.load` restores the run folder as a `Classifier`; `predict` takes file paths,
# PIL images or numpy arrays (any size; they are resized like the training images).

# %%
clf = springfield.load(run.path)
root = Path(json.loads((run.path / "dataset.json").read_text())["root"])
paths = [sorted((root / name).iterdir())[0] for name in clf.classes]
for path, pred in zip(paths, clf.predict(paths, top_k=2), strict=True):
    top = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in pred["top"])
    print(f"{path.parent.name:>14} -> {top}")

image = Image.open(paths[1])
as_array = np.asarray(image)
print(clf.predict([image, as_array], top_k=1))

# %% [markdown]
# ## Evaluate
#
# `evaluate()` scores the run's own validation split (or any `<folder>/<class>/<image>`
# folder): accuracy, loss, per-class precision/recall/F1 and the confusion matrix.

# %%
result = clf.evaluate()
print(f"accuracy {result['accuracy']:.3f} on {result['num_images']} images")
print(np.array(result["confusion"]))

# %% [markdown]
# ## Next
#
# - `springfield.lr_find(...)` (or `lr="auto"` in `train`) suggests a learning rate.
# - `springfield.register_activation(fn)` adds your own activation; `springfield.compare(
#   vary={"activation": ["relu", "gelu"]}, workdir=..., epochs=8)` trains and tabulates them.
