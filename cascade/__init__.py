"""frugalserve.cascade"""
