"""The embedded default: the committed mnist16 teacher samples legible digits of the requested class, offline."""

import torch

from distill.eval.fid import load_classifier
from distill.solvers import per_sample_noise, sample
from teachers import load_teacher


def test_mnist16_teacher_samples_16_digits_of_the_requested_classes():
    teacher = load_teacher("mnist16")
    assert teacher.data_shape == (1, 16, 16) and teacher.num_classes == 10 and teacher.has_uncond
    labels = torch.arange(16) % 10
    with torch.inference_mode():
        x = sample(teacher, per_sample_noise((1, 16, 16), range(16)), solver="dpmpp_2m", nfe=20, cond=labels)
        predicted = load_classifier()(x).argmax(1)
    assert x.shape == (16, 1, 16, 16) and bool(torch.isfinite(x).all())
    assert float((predicted == labels).float().mean()) >= 0.8  # the project's classifier reads the requested digit
