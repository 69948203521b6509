#!/usr/bin/env python
"""Convert a released AFM checkpoint to an AFMPipeline folder (same as the `afm-convert` command).

    python scripts/convert_afm_to_diffusers.py --checkpoint xl2_1nfe_guided_FID2.38.pth \
        --model_size XL/2 --nfe 1 --output_dir afm-xl2-1nfe
"""

from diffusers_afm.conversion.cli import main

if __name__ == "__main__":
    main()
