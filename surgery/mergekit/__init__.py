"""Running mergekit configurations: read the YAML, evaluate its parameters, map it onto our methods.

``config`` reads the file, ``params`` evaluates one setting (scalar, gradient, filters), ``methods``
holds mergekit's method table, ``resolve`` evaluates the whole config per output tensor, and
``native`` turns the result into one of our recipes where the same math exists.
"""
