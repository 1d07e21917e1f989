"""Load testing: the locust users and a bounded headless runner."""
