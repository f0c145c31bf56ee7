// Forward grouped GEMM, configuration 1: 128 x 256 x 64 CTA tile, cluster 2 x 1, cooperative warp groups.
#include "grouped_gemm_sm90.cuh"

using ForwardTile1 = moe::cuda::sm90::TileConfig<128, 256, 64, 2, false>;
MOE_SM90_FORWARD(1, ::ForwardTile1)
