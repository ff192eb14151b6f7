pytest_plugins = ["novalet.devenv.testing"]
