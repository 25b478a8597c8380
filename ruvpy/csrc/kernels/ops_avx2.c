/* The avx2 kernel table: every kernel template compiled with this ISA's flags (see setup.py). */
#define RV_ISA_AVX2 1
#include "kernels/ops_table.h"

RV_OPS_TABLE(avx2)
