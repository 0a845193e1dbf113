# %% [markdown]
# A percent-format script with numpy state, an import, and two values that cannot be pickled.

# %%
import os

import numpy as np

weights = np.arange(12, dtype=np.float64).reshape(3, 4)
mark = os.environ["CAPTURE_TEST_MARK"]

# %% [markdown]
# `greeting.txt` is in the kernel's working directory.

# %%
handle = open("greeting.txt")
greeting = handle.readline().strip()
numbers = (n * n for n in range(3))
print("greeting:", greeting)
