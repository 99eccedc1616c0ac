import os
import sys

# tests import their small helpers (scalar_model) by name
sys.path.insert(0, os.path.dirname(__file__))
