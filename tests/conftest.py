pytest_plugins = ["novalet_dev.testing"]
