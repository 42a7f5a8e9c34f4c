import sys
from pathlib import Path

# Test helper modules (reference data access, fake servers) live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
