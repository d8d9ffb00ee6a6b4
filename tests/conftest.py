import os
import sys

# Tests import the top-level modules (flat layout, as MAE / TVL): put the repo root on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
