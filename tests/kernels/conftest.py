import os

# Triton kernels run on CPU tensors through the interpreter; must be set before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
