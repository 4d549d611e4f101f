"""Heads on pooled features: linear heads in scikit-learn estimator style (torch-free)
and neural heads (torch modules), each with the tensor shapes it saves."""
