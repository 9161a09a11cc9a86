# cmake -DINPUT=file -DOUTPUT=header -DNAME=symbol -P embed.cmake
# Writes a C++ header that holds INPUT's bytes as `NAME`, aligned to 8 bytes
# (as CUDA wants a fat binary image).
file(READ ${INPUT} hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
get_filename_component(source ${INPUT} NAME)
file(WRITE ${OUTPUT} "// Generated from ${source} by cmake/embed.cmake: do not edit.\n"
                     "#pragma once\n"
                     "alignas(8) inline constexpr unsigned char ${NAME}[] = {${bytes}};\n")
