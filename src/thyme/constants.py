"""Numbers and names of the paper / the reference implementation, defined once.

Ground floor: imports nothing (not even of thyme), so every floor, the sandbox's session
processes included, may import it. Each constant names its source; config dataclasses use
these as their defaults instead of repeating the literals.
"""

#: Per-image pixel budget of SFT stage 1 and of the reference's training scripts
#: (Thyme reference ``MAX_PIXELS = 3211264`` = 4096 x 28 x 28, paper Sec. 4.1).
MAX_PIXELS = 3211264

#: Characters of printed sandbox text shown to the model, at most (reference evaluation caps
#: the code output fed back to the model at 4096 characters).
MAX_OUTPUT_CHARS = 4096

#: The output folder the model was trained to write to (the o3 convention of the released
#: Thyme SFT data; the reference's sandbox maps it to the session folder).
OUTPUT_DIR_ALIAS = "/mnt/data/temp_processed_images"

#: The alias's last component: how a path in a record or trajectory is recognised as an output.
OUTPUT_DIR_MARKER = OUTPUT_DIR_ALIAS.rstrip("/").rsplit("/", 1)[-1]

#: Most code repairs (``Fix`` entries) reported per execution (ours: bounds a reply's size).
MAX_FIXES = 50

#: Generation rounds per trajectory (reference evaluation: up to 5).
MAX_ROUNDS = 5

#: Tokens per generation round (reference evaluation: 2048).
MAX_NEW_TOKENS = 2048

#: Crops smaller than this many pixels on a side are grown to it (reference sandbox: 64).
MIN_CROP_SIDE = 64

#: Wall-clock seconds of one code execution (reference sandbox: 10 s).
EXEC_TIMEOUT_S = 10.0
