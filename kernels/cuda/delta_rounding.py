"""How the choice of Δ in the backward's dS = P∘(dP - Δ) shows up in dq once dS is rounded to bf16 for the
tensor cores (kernels/cuda/backward_mma.cuh, kernel A). float64 truth against four ways of computing dq:

  two-sweep   Δ = Σ P∘dP in fp32 (a first sweep over the keys), dS rounded to bf16     (the SIMT kernel A)
  single      dS0 = P∘(dP - Δ0) with Δ0 = do·bf16(out), corrected by (Δ - Δ0)·bf16(P)K   (tensor-core kernel A)
  FA2-style   Δ = do·bf16(out) and nothing else                             (FlashAttention's choice)
  naive bf16  the softmax backward y∘(g - Σ g∘y) evaluated in bf16             (the SPEC §6 yardstick)

    python kernels/cuda/delta_rounding.py
"""
import torch


def bf(t):
    return t.to(torch.bfloat16).to(torch.float64)


def f32(t):
    return t.to(torch.float32).to(torch.float64)


def errors(L, D, sharpness, causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (bf(torch.randn(L, D, generator=g, dtype=torch.float64)) for _ in range(4))
    q = bf(q * sharpness)  # larger scores: peaked rows
    s = q @ k.T / D**0.5
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    P = torch.softmax(s, -1)
    dP = do @ v.T
    dq_true = (P * (dP - (P * dP).sum(-1, keepdim=True))) @ k
    P32, dP32 = f32(P), f32(dP)
    delta = f32((P32 * dP32).sum(-1, keepdim=True))
    delta0 = f32((do * bf(P @ v)).sum(-1, keepdim=True))
    ways = {
        "two-sweep": bf(P32 * (dP32 - delta)) @ k,
        "single": bf(P32 * (dP32 - delta0)) @ k - (delta - delta0) * (bf(P32) @ k),
        "FA2-style": bf(P32 * (dP32 - delta0)) @ k,
    }
    Pb, gb = bf(P), bf(do @ v.T)
    ways["naive bf16"] = bf(Pb * bf(gb - bf((gb * Pb).sum(-1, keepdim=True)))) @ k
    return {name: (dq - dq_true).abs().max().item() for name, dq in ways.items()}, dq_true.abs().max().item()


def main():
    print(f"{'case':<34}" + "".join(f"{n:>12}" for n in ("two-sweep", "single", "FA2-style", "naive bf16")) + "  max|dq|")
    for L, D, sharp, causal in ((256, 64, 1, True), (256, 64, 4, True), (256, 64, 16, True), (512, 128, 8, False)):
        errs, big = errors(L, D, sharp, causal)
        name = f"L {L} D {D} sharpness {sharp} causal {causal}"
        print(f"{name:<34}" + "".join(f"{e:>12.3g}" for e in errs.values()) + f"  {big:.3g}")


if __name__ == "__main__":
    main()
