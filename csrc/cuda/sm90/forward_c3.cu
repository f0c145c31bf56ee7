// Forward grouped GEMM, configuration 3: 256 x 128 x 64 CTA tile, cluster 1 x 1, cooperative warp groups.
#include "grouped_gemm_sm90.cuh"

using ForwardTile3 = moe::cuda::sm90::TileConfig<256, 128, 64, 1, false>;
MOE_SM90_FORWARD(3, ::ForwardTile3)
