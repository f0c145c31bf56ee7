// Forward grouped GEMM, configuration 4: 128 x 256 x 64 CTA tile, cluster 1 x 1, cooperative warp groups.
#include "grouped_gemm_sm90.cuh"

using ForwardTile4 = moe::cuda::sm90::TileConfig<128, 256, 64, 1, false>;
MOE_SM90_FORWARD(4, ::ForwardTile4)
