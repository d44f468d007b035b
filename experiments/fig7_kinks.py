"""Figure 7, rectified column: where the hard-ReLU PED solve does not converge, the MAP sits on a kink.

On 2 000 rows of dataset 0 at the initial globals, finds the MAP of each of the first 40
unconverged rows by Nelder-Mead (10 starts; latent dimension 2) and reports how close one
pre-activation is to 0 there, the sign of y at that coordinate, and how far the solver's last
iterate is from the MAP (quoted in docs/fig7.md). Run: ``python experiments/fig7_kinks.py``.
"""
import sys, torch, numpy as np
from scipy.optimize import minimize
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import fig7
torch.set_num_threads(1)
P = fig7.Protocol(num_data=2000)
col = fig7.COLUMNS["relu"]
d = fig7.simulate(col, 0, P)
enc = fig7.ped_encoder(col, d.seed, torch.float64)
with torch.no_grad():
    s = enc.solve(d.y, throw=False)
W, B = enc.W.detach().numpy(), enc.B.detach().numpy()
bad = np.where(~s.converged.numpy())[0]
print("unconverged", len(bad), "of", len(d.y))
def F(z, y): 
    e = W @ z + B; r = np.maximum(e, 0)
    return 0.5 * col.lam * z @ z + 0.5 * np.sum((r - y) ** 2)
res = []
for i in bad[:40]:
    y = d.y[i].numpy()
    best = None
    for z0 in [s.value[i].numpy(), np.zeros(2), *np.random.default_rng(i).normal(0, 2, (8, 2))]:
        r = minimize(F, z0, args=(y,), method="Nelder-Mead", options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000))
        if best is None or r.fun < best.fun: best = r
    zm = best.x; eta = W @ zm + B
    k = np.argmin(np.abs(eta))
    res.append((np.abs(eta[k]), y[k], np.linalg.norm(zm - s.value[i].numpy()), F(s.value[i].numpy(), y) - best.fun))
res = np.array(res)
print("min |eta| at the MAP: median", np.median(res[:,0]), "max", res[:,0].max())
print("y at that coordinate <0 fraction", np.mean(res[:,1] < 0))
print("|z_iter - z_MAP| median", np.median(res[:,2]), "max", res[:,2].max())
print("F(iter) - F(MAP) median", np.median(res[:,3]), "max", res[:,3].max())
