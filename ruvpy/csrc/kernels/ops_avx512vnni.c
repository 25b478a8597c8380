/* The avx512vnni kernel table: the avx512 templates again, compiled with VNNI (see setup.py),
 * so the quantized matmuls take VPDPBUSD; chosen at import when cpuid reports AVX512_VNNI. */
#define RV_ISA_AVX512 1
#define RV_HAVE_VNNI 1
#include "kernels/ops_table.h"

RV_OPS_TABLE(avx512vnni)
