"""A task of your own: scikit-learn's bundled 8x8 digits (1797 images, nothing downloaded)
and a small MLP. Run it with

    ksam compare --task examples/digits_task.py:task
"""

from sklearn.datasets import load_digits
from torch import nn


def make_model():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def task(test_fraction=0.25):
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype("float32")  # pixel values 0..16 -> [0, 1]
    n = round(test_fraction * len(y))  # the first quarter is the test set
    return {"train_x": x[n:], "train_y": y[n:], "test_x": x[:n], "test_y": y[:n],
            "make_model": make_model,
            "defaults": {"epochs": 30, "batch_size": 64, "lr": 0.05}}
