"""frugalserve.kernels"""
