"""frugalserve.cluster"""
