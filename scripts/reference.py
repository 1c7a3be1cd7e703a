"""The reference-style baselines that benchmarks compare spp with, shared by the scripts beside it (a helper module,
not a script): pruning as the published research scripts run it (Wanda, SparseGPT, magnitude; LLaMA only) and the
plain perplexity loop most evaluation scripts use.

`baseline_prune` catches block 0's inputs one window at a time, runs every block one window at a time, keeps
statistics as running means and picks N:M masks in a Python loop over groups of columns, activations in the model's
dtype. `plain_loop_ppl` runs one window per forward with transformers' own shifted-label loss under `no_grad`.
"""

from __future__ import annotations


def _baseline_nm(W_metric, n, m):
    """Prune-mask (True = prune) with M-N lowest per group, one Python iteration per group of columns."""
    import torch

    mask = torch.zeros_like(W_metric, dtype=torch.bool)
    for ii in range(0, W_metric.shape[1], m):
        tmp = W_metric[:, ii : ii + m].float()
        mask.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return mask


def _baseline_magnitude(W, n_m, sparsity):
    import torch

    W_metric = W.abs()
    if n_m:
        return _baseline_nm(W_metric, *n_m)
    thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity)]
    return W_metric <= thresh


def _baseline_wanda(W, scaler_row, n_m, sparsity):
    import torch

    W_metric = W.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    if n_m:
        return _baseline_nm(W_metric, *n_m)
    mask = torch.zeros_like(W_metric, dtype=torch.bool)
    indices = torch.sort(W_metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * sparsity)]
    return mask.scatter_(1, indices, True)


def _baseline_sparsegpt(W, H, n_m, sparsity, blocksize=128, percdamp=0.01):
    """SparseGPT Algorithm 1 as the reference script lays it out; returns the updated W."""
    import torch

    W = W.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if n_m is None:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if n_m is not None and i % n_m[1] == 0:
                tmp = W1[:, i : i + n_m[1]] ** 2 / (torch.diag(Hinv1)[i : i + n_m[1]].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n_m[1] - n_m[0], dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def baseline_prune(model, windows, method: str, n_m, sparsity: float, device) -> None:
    """Prune `model.model.layers` in place the way the reference scripts do (LLaMA only, one window at a time)."""
    import torch

    layers = model.model.layers
    nsamples, seqlen = windows.shape
    dtype = next(layers[0].parameters()).dtype  # the reference scripts keep activations in the model's dtype
    inps = torch.zeros(nsamples, seqlen, model.config.hidden_size, device=device, dtype=dtype)
    caught = {"i": 0}

    class Catcher(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, **kwargs):
            inps[caught["i"]] = x[0]
            caught["i"] += 1
            caught["kwargs"] = kwargs
            raise ValueError

    if method != "magnitude":
        layers[0] = Catcher(layers[0])
        for j in range(nsamples):
            try:
                model(windows[j : j + 1], use_cache=False)
            except ValueError:
                pass
        layers[0] = layers[0].module
        kwargs = {k: v for k, v in caught["kwargs"].items() if k not in ("cache", "past_key_values")}
        kwargs = {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else
                      v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    outs = torch.zeros_like(inps)
    for layer in layers:
        layer.to(device)
        subset = {n: mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
        stats, handles = {}, []
        if method != "magnitude":
            for name, mod in subset.items():
                cols = mod.weight.shape[1]
                stats[name] = {"n": 0, "s": torch.zeros(cols, device=device) if method == "wanda"
                               else torch.zeros(cols, cols, device=device)}

                def hook(mod, inp, out, name=name):
                    x = inp[0].reshape(-1, inp[0].shape[-1]).float().t()  # (in, tokens)
                    st, tmp = stats[name], 1
                    st["s"] *= st["n"] / (st["n"] + tmp)
                    st["n"] += tmp
                    if method == "wanda":
                        st["s"] += torch.norm(x, p=2, dim=1) ** 2 / st["n"]
                    else:
                        x = (2 / st["n"]) ** 0.5 * x
                        st["s"] += x.matmul(x.t())

                handles.append(mod.register_forward_hook(hook))
            with torch.no_grad():
                for j in range(nsamples):
                    outs[j] = layer(inps[j : j + 1], **kwargs)[0]
            for h in handles:
                h.remove()
        with torch.no_grad():
            for name, mod in subset.items():
                W = mod.weight.data
                if method == "magnitude":
                    W[_baseline_magnitude(W, n_m, sparsity)] = 0
                elif method == "wanda":
                    W[_baseline_wanda(W, stats[name]["s"], n_m, sparsity)] = 0
                else:
                    mod.weight.data = _baseline_sparsegpt(W, stats[name]["s"], n_m, sparsity).to(W.dtype)
            del stats
            if method != "magnitude":
                for j in range(nsamples):
                    outs[j] = layer(inps[j : j + 1], **kwargs)[0]
                inps, outs = outs, inps
        layer.cpu()


# --------------------------------------------------------------------------- perplexity


def plain_loop_ppl(model, windows) -> float:
    """The baseline: one window per forward, transformers' own shifted-label loss."""
    import torch

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for x in windows:
            x = x[None].to(device)
            loss = model(input_ids=x, labels=x).loss  # mean over seqlen - 1 targets
            nll += float(loss) * (x.shape[1] - 1)
            count += x.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))
