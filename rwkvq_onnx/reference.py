"""Reference RWKV-6 / RWKV-7 forward pass in PyTorch, written for clarity.

This is the oracle the ONNX export is checked against (and which is itself
checked against the official implementation's logits in the fixtures). It
follows the official `rwkv` package's formulas one to one; the WKV
recurrence is an explicit loop over time.

State layout (shared with the ONNX graphs):
  att_shift [L, B, C], ffn_shift [L, B, C], wkv [L, B, H, N, N] (float32).
For x070 `wkv[l, b, h]` is indexed [value, key] as in the official code;
for x060 it is [key, value].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import ModelConfig

GROUP_NORM_EPS = 64e-5


@dataclass
class State:
    """Recurrent state of the whole model."""

    att_shift: torch.Tensor
    ffn_shift: torch.Tensor
    wkv: torch.Tensor

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, dtype: torch.dtype = torch.float32) -> "State":
        L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        return cls(
            torch.zeros(L, batch, C, dtype=dtype),
            torch.zeros(L, batch, C, dtype=dtype),
            torch.zeros(L, batch, H, N, N, dtype=torch.float32),
        )

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.att_shift.numpy(), self.ffn_shift.numpy(), self.wkv.numpy()


def _token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """x [B, T, C] -> the previous token's x, with `prev` [B, C] before the first."""
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)


def _group_norm(x: torch.Tensor, n_head: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    B, T, C = x.shape
    y = F.group_norm(x.reshape(B * T, C), n_head, weight, bias, eps=GROUP_NORM_EPS)
    return y.reshape(B, T, C)


class RwkvReference:
    """RWKV-6/7 language model over a checkpoint's float32 weights."""

    def __init__(self, config: ModelConfig, state_dict: Mapping[str, np.ndarray]) -> None:
        self.config = config
        self.w = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state_dict.items()}
        # Element-wise vectors are stored [1, 1, C]; use them flat.
        for k, v in self.w.items():
            if v.dim() == 3 and v.shape[:2] == (1, 1):
                self.w[k] = v.reshape(-1)

    def zero_state(self, batch: int = 1) -> State:
        return State.zeros(self.config, batch)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor | np.ndarray, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Sequence mode: tokens [B, T] -> logits [B, T, V] and the state after the last token."""
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        B = tokens.shape[0]
        state = self.zero_state(B) if state is None else state
        w = self.w
        C = self.config.n_embd
        x = F.embedding(tokens, w["emb.weight"])
        x = F.layer_norm(x, (C,), w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
        att_shift, ffn_shift, wkv = [], [], []
        v_first = None
        for i in range(self.config.n_layer):
            b = f"blocks.{i}."
            xx = F.layer_norm(x, (C,), w[b + "ln1.weight"], w[b + "ln1.bias"])
            if self.config.version == "x070":
                out, s, v_first = self._time_mix_x070(i, xx, state.att_shift[i], state.wkv[i], v_first)
            else:
                out, s = self._time_mix_x060(i, xx, state.att_shift[i], state.wkv[i])
            att_shift.append(xx[:, -1])
            wkv.append(s)
            x = x + out
            xx = F.layer_norm(x, (C,), w[b + "ln2.weight"], w[b + "ln2.bias"])
            x = x + self._channel_mix(i, xx, state.ffn_shift[i])
            ffn_shift.append(xx[:, -1])
        x = F.layer_norm(x, (C,), w["ln_out.weight"], w["ln_out.bias"])
        logits = x @ w["head.weight"].T
        return logits, State(torch.stack(att_shift), torch.stack(ffn_shift), torch.stack(wkv))

    def step(self, token: torch.Tensor | np.ndarray, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Step mode: token [B] -> logits [B, V] and the next state."""
        token = torch.as_tensor(np.asarray(token), dtype=torch.long).reshape(-1)
        logits, state = self.forward(token.unsqueeze(1), state)
        return logits[:, 0], state

    # -- RWKV-7 -----------------------------------------------------------
    def _time_mix_x070(self, i, x, prev, state, v_first):
        w = self.w
        a = f"blocks.{i}.att."
        H, N = self.config.n_head, self.config.head_size
        B, T, C = x.shape
        xx = _token_shift(x, prev) - x
        xr, xw, xk, xv, xa, xg = (x + xx * w[a + n] for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r = xr @ w[a + "receptance.weight"].T
        k = xk @ w[a + "key.weight"].T
        v = xv @ w[a + "value.weight"].T
        decay = torch.tanh(xw @ w[a + "w1"]) @ w[a + "w2"]
        iclr = torch.sigmoid(w[a + "a0"] + (xa @ w[a + "a1"]) @ w[a + "a2"])
        g = torch.sigmoid(xg @ w[a + "g1"]) @ w[a + "g2"]
        kk = F.normalize((k * w[a + "k_k"]).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (iclr - 1) * w[a + "k_a"])
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(w[a + "v0"] + (xv @ w[a + "v1"]) @ w[a + "v2"])
        decay = torch.exp(-0.606531 * torch.sigmoid(w[a + "w0"] + decay))  # 0.606531 = exp(-0.5)
        outs = []
        for t in range(T):
            r_t, w_t, k_t, v_t = (z[:, t].view(B, H, N) for z in (r, decay, k, v))
            kk_t = kk[:, t].view(B, H, N)
            a_t = iclr[:, t].view(B, H, N)
            # S <- S diag(w) + (S (-kk)) (kk*a)^T + v k^T ;  y = S r
            state = (
                state * w_t.unsqueeze(2)
                + (state @ (-kk_t).unsqueeze(3)) @ (kk_t * a_t).unsqueeze(2)
                + v_t.unsqueeze(3) @ k_t.unsqueeze(2)
            )
            outs.append((state @ r_t.unsqueeze(3)).view(B, C))
        y = _group_norm(torch.stack(outs, dim=1), H, w[a + "ln_x.weight"], w[a + "ln_x.bias"])
        bonus = (r * k * w[a + "r_k"].reshape(C)).view(B, T, H, N).sum(-1, keepdim=True) * v.view(B, T, H, N)
        y = y + bonus.view(B, T, C)
        return (y * g) @ w[a + "output.weight"].T, state, v_first

    # -- RWKV-6 -----------------------------------------------------------
    def _time_mix_x060(self, i, x, prev, state):
        w = self.w
        a = f"blocks.{i}.att."
        H, N = self.config.n_head, self.config.head_size
        B, T, C = x.shape
        xx = _token_shift(x, prev) - x
        xxx = x + xx * w[a + "time_maa_x"]
        lm = self.config.lora["maa"]
        xxx = torch.tanh(xxx @ w[a + "time_maa_w1"]).view(B, T, 5, 1, lm)
        mw, mk, mv, mr, mg = (xxx @ w[a + "time_maa_w2"]).view(B, T, 5, C).unbind(dim=2)
        xw = x + xx * (w[a + "time_maa_w"] + mw)
        xk = x + xx * (w[a + "time_maa_k"] + mk)
        xv = x + xx * (w[a + "time_maa_v"] + mv)
        xr = x + xx * (w[a + "time_maa_r"] + mr)
        xg = x + xx * (w[a + "time_maa_g"] + mg)
        r = xr @ w[a + "receptance.weight"].T
        k = xk @ w[a + "key.weight"].T
        v = xv @ w[a + "value.weight"].T
        g = F.silu(xg @ w[a + "gate.weight"].T)
        decay = w[a + "time_decay"] + torch.tanh(xw @ w[a + "time_decay_w1"]) @ w[a + "time_decay_w2"]
        decay = torch.exp(-torch.exp(decay))
        u = w[a + "time_faaaa"].view(1, H, N, 1)
        outs = []
        for t in range(T):
            r_t, w_t, k_t, v_t = (z[:, t].view(B, H, N) for z in (r, decay, k, v))
            kv = k_t.unsqueeze(3) @ v_t.unsqueeze(2)  # [B, H, key, value]
            outs.append((r_t.unsqueeze(2) @ (u * kv + state)).view(B, C))
            state = kv + w_t.unsqueeze(3) * state
        y = _group_norm(torch.stack(outs, dim=1), H, w[a + "ln_x.weight"], w[a + "ln_x.bias"])
        return (y * g) @ w[a + "output.weight"].T, state

    # -- channel mix --------------------------------------------------------
    def _channel_mix(self, i, x, prev):
        w = self.w
        f = f"blocks.{i}.ffn."
        xx = _token_shift(x, prev) - x
        if self.config.version == "x070":
            k = x + xx * w[f + "x_k"]
            return torch.relu(k @ w[f + "key.weight"].T).square() @ w[f + "value.weight"].T
        k = x + xx * w[f + "time_maa_k"]
        r = x + xx * w[f + "time_maa_r"]
        hidden = torch.relu(k @ w[f + "key.weight"].T).square()
        return torch.sigmoid(r @ w[f + "receptance.weight"].T) * (hidden @ w[f + "value.weight"].T)
