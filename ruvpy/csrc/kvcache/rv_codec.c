/* The table of cold formats (see rv_codec.h). */
#include "kvcache/rv_codec.h"

const rv_codec *const rv_codecs[RV_CODEC_COUNT] = {&rv_codec_q8, &rv_codec_q4, &rv_codec_turbo};
