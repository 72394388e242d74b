"""Everything between a user's prompt and the model's integer/float inputs: images and videos to
`pixel_values` + `grid_thw`, the chat template, the tokenizer, placeholder expansion, the
`Processor`. NumPy, PIL, tokenizers and jinja2 only; torch only when a caller hands in a tensor.
"""

from slimm.processing.chat_template import QWEN2_VL_CHAT_TEMPLATE, apply_chat_template
from slimm.processing.image import as_image_list, load_image, load_rgb, smart_resize
from slimm.processing.patches import ImageProcessor
from slimm.processing.placeholders import IMAGE_PAD, VIDEO_PAD, expand_vision_placeholders
from slimm.processing.processor import Processor
from slimm.processing.tokenizer import Tokenizer, clean_up_tokenization, default_tokenizer_dir
from slimm.processing.video import as_video_list, list_frames

__all__ = [
    "IMAGE_PAD",
    "QWEN2_VL_CHAT_TEMPLATE",
    "VIDEO_PAD",
    "ImageProcessor",
    "Processor",
    "Tokenizer",
    "apply_chat_template",
    "as_image_list",
    "as_video_list",
    "clean_up_tokenization",
    "default_tokenizer_dir",
    "expand_vision_placeholders",
    "list_frames",
    "load_image",
    "load_rgb",
    "smart_resize",
]
