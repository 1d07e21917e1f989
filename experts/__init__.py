"""frugalserve.experts"""
