// Forward grouped GEMM, configuration 5: 64 x 256 x 64 CTA tile, cluster 1 x 1, ping-pong warp groups.
#include "grouped_gemm_sm90.cuh"

using ForwardTile5 = moe::cuda::sm90::TileConfig<64, 256, 64, 1, true>;
MOE_SM90_FORWARD(5, ::ForwardTile5)
