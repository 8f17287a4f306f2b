# Generates web_page.cpp holding transfer/web/index.html (run by the build).
file(READ ${INPUT} content)
file(WRITE ${OUTPUT} "// Generated from transfer/web/index.html by embed_web_page.cmake.\n"
  "#include \"web_page.hpp\"\n"
  "namespace otpgate::transfer {\n"
  "const std::string& web_page() {\n"
  "  static const std::string page = R\"OTPWEB(${content})OTPWEB\";\n"
  "  return page;\n"
  "}\n"
  "}  // namespace otpgate::transfer\n")
