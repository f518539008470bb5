import sys; sys.path.insert(0, "tests"); sys.path.insert(0, "tests/engine")
import torch, hbpkit
import test_attention as ta
m = ta._attention_model("bias-kv")
g = hbpkit.convert(m)
print(g.graph)
print(g.hbpkit_region_0)
