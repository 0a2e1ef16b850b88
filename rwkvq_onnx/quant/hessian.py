"""Hessian utilities shared by GPTQ and GPTVQ (pure functions on arrays)."""
from __future__ import annotations

import numpy as np
import torch


def prepare(w: np.ndarray, h: np.ndarray, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W as float64 with dead input columns zeroed, and the upper Cholesky factor of the damped H^-1.

    Dead columns (no calibration signal) get H_ii = 1 so H stays invertible;
    dampening adds `damp` x mean(diag H) to the diagonal, as GPTQ does.
    """
    W = torch.as_tensor(np.asarray(w, np.float64)).clone()
    H = torch.as_tensor(np.asarray(h, np.float64)).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(H.shape[0], dtype=H.dtype) * damp * torch.mean(torch.diag(H))
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        try:
            L = torch.linalg.cholesky(H + torch.eye(H.shape[0], dtype=H.dtype) * extra * torch.mean(torch.diag(H)))
            Hinv = torch.cholesky_inverse(L)
            return W, torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Hessian is not positive definite even after extra dampening")


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """Hessian-weighted output error tr(dW H dW^T) / 2 = mean ||x dW^T||^2 over calibration inputs."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum((d @ np.asarray(h, np.float64)) * d) / 2.0)
