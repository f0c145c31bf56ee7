// Forward grouped GEMM, configuration 2: 128 x 128 x 64 CTA tile, cluster 2 x 1, cooperative warp groups.
#include "grouped_gemm_sm90.cuh"

using ForwardTile2 = moe::cuda::sm90::TileConfig<128, 128, 64, 2, false>;
MOE_SM90_FORWARD(2, ::ForwardTile2)
