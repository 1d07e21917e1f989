"""frugalserve.serve_app"""
