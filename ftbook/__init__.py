"""ftbook: the helper package of the executable book on pre-training and fine-tuning."""
import warnings

__version__ = "0.1.0"

# tqdm.auto warns when ipywidgets is absent and then falls back to text bars, which is what we want.
warnings.filterwarnings("ignore", message="IProgress not found")

from .env import setup  # noqa: E402,F401
